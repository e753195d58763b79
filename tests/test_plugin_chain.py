"""The plugin chain runner: stage time budget (plugin_timeout) and header checks."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent

from pymta.config.errors import ConfigError
from pymta.config.loader import load_config
from pymta.config.model import PluginInstance
from pymta.server.auth import IAuthenticatedUser, build_portal
from pymta.server.chain import (PLUGIN_FAILURE, PLUGIN_TIMEOUT, PluginTimeout, StageDeadline,
                                run_chain)
from pymta.verdict import DUNNO, Kind, Verdict, header_problem


class Plugin:
    """Answers check_recipient with whatever ``answer`` makes of the call."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def check_recipient(self, *args):
        self.calls += 1
        return self.answer()


def chain(*objs):
    return [PluginInstance(f"p{i}", f"site:P{i}", obj) for i, obj in enumerate(objs)]


def outcome(result):
    box = []
    if isinstance(result, Deferred):
        result.addBoth(lambda r: (box.append(r), r)[1])
        return box[0] if box else None
    return result


def lines(events):
    return [formatEvent(e) for e in events]


def test_a_deferred_that_never_fires_times_out_naming_the_plugin():
    clock = Clock()
    pending = Deferred()
    plugins = chain(Plugin(lambda: DUNNO), Plugin(lambda: pending))
    with capturedLogs() as events:
        result = run_chain(plugins, "check_recipient", "s", "t", "a@b",
                           stage="rcpt", deadline=StageDeadline(clock, 30))
        clock.advance(29.9)
        assert outcome(result) is None          # still waiting
        clock.advance(0.2)
    assert outcome(result) is PLUGIN_TIMEOUT
    assert (PLUGIN_TIMEOUT.code, PLUGIN_TIMEOUT.enhanced) == (451, "4.3.0")
    assert "plugin p1 (site:P1) timed out after 30s in rcpt (check_recipient)" in lines(events)
    assert pending.called                       # cancelled
    # the late answer is swallowed: no AlreadyCalledError, no change of outcome
    pending.callback(Verdict.reject())
    assert outcome(result) is PLUGIN_TIMEOUT
    assert not clock.getDelayedCalls()


def test_the_budget_is_per_stage_shared_by_the_plugins_in_turn():
    clock = Clock()
    slow = [Plugin(lambda: deferLater(clock, 20, lambda: DUNNO)) for _ in range(2)]
    result = run_chain(chain(*slow), "check_recipient", stage="rcpt",
                       deadline=StageDeadline(clock, 30))
    clock.advance(20)                           # the first answered in time
    assert slow[1].calls == 1 and outcome(result) is None
    clock.advance(10)                           # the second got the 10 s left
    assert outcome(result) is PLUGIN_TIMEOUT
    clock.advance(100)                          # its cancelled deferLater never fires
    assert outcome(result) is PLUGIN_TIMEOUT


def test_answers_in_time_cancel_the_timer():
    clock = Clock()
    fast = Plugin(lambda: deferLater(clock, 1, lambda: Verdict.accept("yes")))
    result = run_chain(chain(fast), "check_recipient", stage="rcpt",
                       deadline=StageDeadline(clock, 30))
    clock.advance(1)
    assert outcome(result).text == "yes"
    assert not clock.getDelayedCalls()
    # an already-fired Deferred does not even start a timer
    result = run_chain(chain(Plugin(lambda: succeed(DUNNO))), "check_recipient",
                       deadline=StageDeadline(clock, 30))
    assert outcome(result) is DUNNO and not clock.getDelayedCalls()


def test_a_canceller_that_misbehaves_does_not_reach_the_session():
    clock = Clock()

    def rude_canceller(d):
        raise RuntimeError("cannot cancel")

    pending = Deferred(rude_canceller)
    with capturedLogs() as events:
        result = run_chain(chain(Plugin(lambda: pending)), "check_recipient", stage="mail",
                           deadline=StageDeadline(clock, 5))
        clock.advance(5)
    assert outcome(result) is PLUGIN_TIMEOUT
    assert any("cancelling its check_recipient call failed" in line for line in lines(events))


def test_auth_checkers_share_the_budget_and_are_named():
    clock = Clock()

    class Never:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials):
            return Deferred()

    portal = build_portal([PluginInstance("ldap", "site:Never", Never())], StageDeadline(clock, 2))
    box = []
    with capturedLogs() as events:
        portal.login(UsernamePassword(b"u", b"p"), None, IAuthenticatedUser).addBoth(box.append)
        clock.advance(2)
    assert box and box[0].check(PluginTimeout)
    assert "plugin ldap (site:Never) timed out after 2s in auth (requestAvatarId)" in lines(events)
    # without a deadline the old behaviour: the checker decides
    assert build_portal([Never()]) is not None


# ------------------------------------------------------------ header checks
GOOD = [
    ("X-Spam", "yes"),
    ("Authentication-Results", "mx.example; spf=pass\r\n\tsmtp.mailfrom=a@b.example"),
    ("X-Empty", ""),
    ("X-Utf8", "grüße"),
    ("X-Long", "a" * (998 - len("X-Long: "))),
]
BAD = [
    (("X Space", "v"), "not 1*ftext"),
    (("X:Colon", "v"), "not 1*ftext"),
    (("", "v"), "not 1*ftext"),
    (("X-Ümlaut", "v"), "not 1*ftext"),
    (("X-LF", "one\ntwo"), "bare CR or LF"),
    (("X-CR", "one\rtwo"), "bare CR or LF"),
    (("X-Inject", "v\r\nBcc: victim@example.org"), "not followed by a space or tab"),
    (("X-End", "v\r\n"), "not followed by a space or tab"),
    (("X-Blank", "v\r\n \r\n x"), "only white space"),
    (("X-NUL", "a\x00b"), "control character"),
    (("X-Long", "a" * (999 - len("X-Long: "))), "999 octets"),
    (("X-Fold", "a\r\n " + "b" * 998), "999 octets"),
    (("X-Int", 3), "must be strings"),
    ("X-Pair: v", "not a (name, value) pair"),
    (("X-Surrogate", "\udc80"), "UTF-8"),
]


def test_good_headers_pass():
    assert header_problem(tuple(GOOD), (0, 3)) is None


def test_each_bad_header_is_named():
    for item, problem in BAD:
        found = header_problem((("X-Ok", "fine"), item))
        assert found is not None and problem in found, (item, found)


def test_bad_drop_headers():
    assert "not a header field position" in header_problem((), (-1,))
    assert "not a header field position" in header_problem((), ("3",))
    assert "not a header field position" in header_problem((), (True,))
    assert "must be a tuple" in header_problem((), 3)


def test_a_bad_header_is_a_plugin_failure_and_is_logged():
    bad = Plugin(lambda: Verdict(Kind.DUNNO, headers=(("X-Evil", "x\nBcc: a@b"),)))
    later = Plugin(lambda: Verdict.accept())
    with capturedLogs() as events:
        result = run_chain(chain(bad, later), "check_recipient")
    assert result is PLUGIN_FAILURE and (result.code, result.enhanced) == (451, "4.3.5")
    assert later.calls == 0
    [line] = [l for l in lines(events) if "bad header change" in l]
    assert "plugin p0 (site:P0)" in line and "'X-Evil'" in line and "\n" not in line


def test_a_bad_header_from_a_deferred_is_a_plugin_failure():
    d = Deferred()
    result = run_chain(chain(Plugin(lambda: d)), "check_recipient")
    d.callback(Verdict(Kind.ACCEPT, headers=(("Bad Name", "v"),)))
    assert outcome(result) is PLUGIN_FAILURE


def _written(name: str, value: str) -> bytes:
    """The field as the core writes it (pymta.server.reception.Reception._envelope)."""
    return f"{name}: {value}\r\n".encode("utf-8")


@given(st.text(min_size=1, max_size=20), st.text(max_size=60))
def test_accepted_headers_are_one_well_formed_field(name, value):
    if header_problem(((name, value),)) is not None:
        return
    raw = _written(name, value)
    physical = raw.split(b"\r\n")
    assert physical[-1] == b""                               # ends with CRLF, once
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\x00" not in raw
    assert all(len(line) <= 998 for line in physical)
    assert all(line[:1] in (b" ", b"\t") and line.strip() for line in physical[1:-1])
    field_name = physical[0].split(b":", 1)[0]
    assert field_name == name.encode() and all(33 <= c <= 126 for c in field_name)


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=30),
       st.sampled_from(["\r", "\n", "\r\n", "\x00", "\r\nX-Injected: 1"]),
       st.text(alphabet=st.characters(codec="ascii"), max_size=30))
def test_newlines_that_do_not_fold_are_always_caught(before, newline, after):
    value = before + newline + after
    if newline == "\r\n" and after[:1] in (" ", "\t") and after.strip(" \t"):
        return                                                # proper folding
    assert header_problem((("X-Test", value),)) is not None


# ------------------------------------------------------------ the config key
def test_plugin_timeout_config(tmp_path):
    path = tmp_path / "pymta.toml"
    path.write_text('[limits]\nplugin_timeout = "2m"\n')
    assert load_config(str(path)).limits.plugin_timeout == 120.0
    path.write_text("[server]\n")
    assert load_config(str(path)).limits.plugin_timeout == 30.0
    for bad in ("0", '"soon"', "-1"):
        path.write_text(f"[limits]\nplugin_timeout = {bad}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(path))
        message = str(e.value)
        assert str(path) in message and "limits.plugin_timeout" in message and "\n" not in message


def test_each_stage_names_a_method_of_its_interface():
    from zope.interface.interface import Method

    from pymta.interfaces import STAGES
    for stage, (interface, method) in STAGES.items():
        assert isinstance(interface.get(method), Method), (stage, interface, method)
