"""Run a stage's plugins in order until one decides.

A plugin may answer synchronously or with a Deferred; the runner stays
synchronous as long as the plugins are (no Deferred on the hot path).
A plugin that raises or fails is logged and turns into a temporary refusal
(451 4.3.5), never a traceback to the client; so does a verdict the core
cannot use (not a Verdict, or header fields that are not well formed).

A stage has a time budget (``[limits] plugin_timeout``, a
:class:`StageDeadline`): the budget starts when the stage first waits
for a Deferred and is shared by all its plugins in turn (a per-stage
limit, not one per plugin); the plugin whose Deferred is still
pending when it runs out is logged by name, its Deferred is cancelled (a
result arriving later is ignored) and the stage answers 451 4.3.0.

With an observer (the metrics' plugin timing, ``pymta test-session``'s
report), each plugin's answer is reported to it with the time it took, a
Deferred one's when it fires; without one the chain reads no clock.
"""

from __future__ import annotations

import dataclasses
from time import perf_counter
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pymta.config.model import PluginInstance
from pymta.handoff import handed_off
from pymta.interfaces import STAGES
from pymta.verdict import DUNNO, Kind, Verdict, header_problem

log = Logger(namespace="pymta.plugins")

PLUGIN_FAILURE = Verdict(Kind.DEFER, 451, "4.3.5", "Server configuration problem; try again later")
PLUGIN_TIMEOUT = Verdict(Kind.DEFER, 451, "4.3.0", "Error: plugin timeout; try again later")


class PluginTimeout(Exception):
    """A plugin's Deferred did not fire within its stage's time budget (already logged)."""


@dataclasses.dataclass(frozen=True)
class StageDeadline:
    """How long a stage may wait for its plugins: ``seconds`` on ``clock`` (an IReactorTime)."""
    clock: Any
    seconds: float


#: ``observer(stage, plugin, outcome, seconds)``: told each plugin's answer (a
#: Verdict, None, another value, an exception or a Failure) and how long it took
#: (the metrics' plugin timing, ``pymta test-session``'s report)
StageObserver = Callable[[str, PluginInstance, Any, float], None]


def run_stage(stage: str, plugins: Sequence[PluginInstance], *args: Any,
              deadline: StageDeadline | None = None,
              observer: StageObserver | None = None) -> Verdict | Deferred:
    """Run the plugins of ``stage``, calling the method :data:`pymta.interfaces.STAGES` names for it."""
    return run_chain(plugins, STAGES[stage].method, *args, stage=stage, deadline=deadline,
                     observer=observer)


def run_chain(plugins: Sequence[PluginInstance], method: str, *args: Any,
              stage: str = "", deadline: StageDeadline | None = None,
              observer: StageObserver | None = None) -> Verdict | Deferred:
    """Return the first decided verdict (or DUNNO); header changes of undecided ones are kept.

    With a ``deadline``, a Deferred answer that is still pending when the
    stage's budget is spent gives PLUGIN_TIMEOUT instead.  With an
    ``observer``, each plugin's answer and its time are reported to it.
    """
    return _run(plugins, 0, method, args, ((), ()), (stage or method, deadline, None), observer)


def observed_answer(result: Any, observer: StageObserver, stage: str, plugin: PluginInstance,
                    started: float) -> Any:
    """A Deferred's callback (both ways): tell ``observer`` the answer and the time since ``started``."""
    observer(stage, plugin, result, perf_counter() - started)
    return result


def _run(plugins, start, method, args, headers, budget, observer=None) -> Verdict | Deferred:
    for i in range(start, len(plugins)):
        plugin = plugins[i]
        if observer is not None:
            started = perf_counter()
        try:
            result = getattr(plugin.obj, method)(*args)
        except Exception as e:
            if observer is not None:
                observer(budget[0], plugin, e, perf_counter() - started)
            log.failure("plugin {name} ({use}) failed in {method}", name=plugin.name,
                        use=plugin.use, method=method)
            return PLUGIN_FAILURE
        if isinstance(result, Deferred):
            stage, deadline, ends = budget
            if deadline is not None and ends is None:
                # the budget starts with the first wait (synchronous plugins
                # hold the reactor anyway): no clock reads on the hot path
                ends = deadline.clock.seconds() + deadline.seconds
                budget = (stage, deadline, ends)

            def resumed(verdict, i=i, plugin=plugin):
                verdict = _checked(plugin, method, verdict)
                if verdict is None:
                    return PLUGIN_FAILURE
                merged = _merge(headers, verdict)
                if verdict.decided:
                    return _with_headers(verdict, merged)
                return _run(plugins, i + 1, method, args, merged, budget, observer)

            def failed(failure, plugin=plugin):
                if failure.check(PluginTimeout):
                    return PLUGIN_TIMEOUT
                log.failure("plugin {name} ({use}) failed in {method}", failure,
                            name=plugin.name, use=plugin.use, method=method)
                return PLUGIN_FAILURE

            if observer is not None:
                result.addBoth(observed_answer, observer, stage, plugin, started)
            if deadline is not None:
                result = within(result, deadline.clock, ends - deadline.clock.seconds(),
                                plugin, stage, method, deadline.seconds)
            return result.addCallbacks(resumed, failed)
        if observer is not None:
            observer(budget[0], plugin, result, perf_counter() - started)
        verdict = _checked(plugin, method, result)
        if verdict is None:
            return PLUGIN_FAILURE
        headers = _merge(headers, verdict)
        if verdict.decided:
            return _with_headers(verdict, headers)
    return _with_headers(DUNNO, headers)


def within(d: Deferred, clock: Any, remaining: float, plugin: PluginInstance, stage: str,
           method: str, budget: float) -> Deferred:
    """A Deferred with ``d``'s result, or failing with PluginTimeout after ``remaining`` seconds.

    On timeout the line naming the plugin is logged and ``d`` is cancelled;
    whatever ``d`` does later (fire, fail, fire again from a canceller that
    did not) never reaches the returned Deferred, so it cannot touch the
    session that asked.
    """
    timer = None

    def answered() -> None:
        if timer is not None:
            timer.cancel()

    # too late, the stage has answered already: a late result or failure (or
    # the CancelledError) ends in handed_off
    out = handed_off(d, before=answered)
    if out.called:                   # answered at once: no timer needed
        return out

    def expired():
        log.error("plugin {name} ({use}) timed out after {budget} in {stage} ({method})",
                  name=plugin.name, use=plugin.use, budget=f"{budget:g}s", stage=stage,
                  method=method)
        out.errback(PluginTimeout(f"plugin {plugin.name} timed out"))
        try:
            d.cancel()
        except Exception:
            log.failure("plugin {name} ({use}): cancelling its {method} call failed",
                        name=plugin.name, use=plugin.use, method=method)

    timer = clock.callLater(max(remaining, 0.0), expired)
    return out


def _checked(plugin: PluginInstance, method: str, result: Any) -> Verdict | None:
    if result is None:
        return DUNNO
    if not isinstance(result, Verdict):
        log.error("plugin {name} ({use}) returned {result!r} from {method}, not a Verdict",
                  name=plugin.name, use=plugin.use, result=result, method=method)
        return None
    if result.headers or result.drop_headers:
        problem = header_problem(result.headers, result.drop_headers)
        if problem is not None:
            log.error("plugin {name} ({use}) returned a bad header change from {method}: {problem}",
                      name=plugin.name, use=plugin.use, method=method, problem=problem)
            return None
    return result


def _merge(acc: tuple, verdict: Verdict) -> tuple:
    """Header additions and removals of every plugin that ran, in order."""
    added, dropped = acc
    return added + tuple(verdict.headers), dropped + tuple(verdict.drop_headers)


def _with_headers(verdict: Verdict, acc: tuple) -> Verdict:
    added, dropped = acc
    if added == verdict.headers and dropped == verdict.drop_headers:
        return verdict
    return dataclasses.replace(verdict, headers=added, drop_headers=tuple(sorted(set(dropped))))
