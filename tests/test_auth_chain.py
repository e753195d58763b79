"""Several [stages] auth checkers are tried in order."""

from __future__ import annotations

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse as Memory
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from pymta.server.auth import AuthFailureDelay, IAuthenticatedUser, build_portal


def login(portal, user: bytes, password: bytes):
    results = []
    portal.login(UsernamePassword(user, password), None, IAuthenticatedUser).addBoth(results.append)
    return results[0]


def test_each_checker_is_asked_in_turn():
    first, second = Memory(alice=b"one"), Memory(bob=b"two", alice=b"other")
    portal = build_portal([first, second])
    assert login(portal, b"alice", b"one")[1] == b"alice"
    assert login(portal, b"bob", b"two")[1] == b"bob"
    assert login(portal, b"alice", b"other")[1] == b"alice"     # second checker knows it too
    assert login(portal, b"carol", b"x").check(UnauthorizedLogin)


def test_no_checker_no_portal():
    assert build_portal([]) is None


def test_failure_delay_doubles_per_client_and_resets():
    delay = AuthFailureDelay(0.5)
    assert [delay.failed("192.0.2.1", t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 4.0]
    assert delay.failed("192.0.2.2", 4) == 0.5                  # another client starts afresh
    assert max(delay.failed("192.0.2.1", 5 + i) for i in range(10)) == 30.0
    delay.succeeded("192.0.2.1")
    assert delay.failed("192.0.2.1", 20) == 0.5
    assert delay.failed("192.0.2.2", 4 + 901) == 0.5            # forgotten after 15 quiet minutes


# -- the mechanisms offered -------------------------------------------------------------

class _Narrowing:
    """A checker that can check only some mechanisms (None: does not know yet)."""

    def __init__(self, mechanisms):
        self.mechanisms = mechanisms

    def sasl_mechanisms(self):
        return self.mechanisms


def test_offered_mechanisms_are_narrowed_only_when_every_checker_narrows():
    from pymta.server.auth import offered_mechanisms
    both = ("PLAIN", "LOGIN")
    assert offered_mechanisms([_Narrowing(("PLAIN", "CRAM-MD5"))], both) == ("PLAIN",)
    assert offered_mechanisms([_Narrowing(("login",)), _Narrowing(("PLAIN",))], both) == both
    assert offered_mechanisms([_Narrowing(None)], both) == both          # not known yet
    assert offered_mechanisms([_Narrowing(("CRAM-MD5",))], both) == both  # none usable: 454 later
    assert offered_mechanisms([_Narrowing(("PLAIN",)), object()], both) == both
