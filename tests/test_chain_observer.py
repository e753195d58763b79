"""run_stage's observer (pymta test-session): told each plugin's answer, changes nothing."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pymta.config.model import PluginInstance
from pymta.server.chain import PLUGIN_FAILURE, PLUGIN_TIMEOUT, StageDeadline, run_stage
from pymta.server.dry_session import describe_outcome
from pymta.verdict import DUNNO, Verdict


class Rcpt:
    def __init__(self, answer):
        self.answer = answer

    def check_recipient(self, session, transaction, recipient):
        return self.answer()


def plugins(*answers):
    return [PluginInstance(f"p{i}", f"site:P{i}", Rcpt(a)) for i, a in enumerate(answers)]


def run(chain, observer=None, deadline=None):
    return run_stage("rcpt", chain, None, None, "a@example.org", deadline=deadline, observer=observer)


def test_each_answer_is_observed_and_the_result_is_the_same():
    reject = Verdict.reject("no", 550, "5.7.1")
    chain = plugins(lambda: None, lambda: DUNNO, lambda: reject, lambda: Verdict.accept())
    seen = []
    assert run(chain, lambda *report: seen.append(report)) is run(chain) is reject
    assert [(stage, plugin.name, answer) for stage, plugin, answer, _ in seen] == [
        ("rcpt", "p0", None), ("rcpt", "p1", DUNNO), ("rcpt", "p2", reject)]
    assert all(seconds >= 0 for *_, seconds in seen)
    assert [describe_outcome(answer) for *_, answer, _ in seen] == [
        "dunno (returned None)", "dunno", "reject 550 5.7.1 no"]


def test_failures_deferreds_and_timeouts_are_observed():
    def broken():
        raise RuntimeError("down")

    seen = []
    observe = lambda stage, plugin, answer, seconds: seen.append(describe_outcome(answer))
    assert run(plugins(broken), observe) is PLUGIN_FAILURE
    assert run(plugins(lambda: 42), observe) is PLUGIN_FAILURE
    pending = Deferred()
    result = run(plugins(lambda: pending), observe)
    pending.callback(Verdict.accept(rewrite=["b@example.org"]))
    assert result.result.kind.value == "accept"
    clock = Clock()
    hanging = run(plugins(Deferred), observe, StageDeadline(clock, 5))
    clock.advance(5)
    assert hanging.result is PLUGIN_TIMEOUT
    assert seen == ["raised RuntimeError: down", "returned 42, not a Verdict",
                    "accept; rewrite to b@example.org",
                    "no answer in time: cancelled (plugin_timeout)"]


def test_without_an_observer_the_plugins_are_called_as_they_are():
    plugin = plugins(lambda: DUNNO)

    class Watching(Rcpt):
        def check_recipient(self, *args):
            watched.append(self)
            return DUNNO

    watched = []
    obj = Watching(None)
    run([PluginInstance("w", "site:W", obj)])
    assert watched == [obj]
    assert run(plugin) is DUNNO
