"""SMTP AUTH checked by a real, private Dovecot (the ``dovecot`` checker): right and wrong
passwords over STARTTLS on a submission listener, nologin, the mechanisms Dovecot offers,
454 while Dovecot is down, and the connection opened again when it is back."""

from __future__ import annotations

import smtplib
import socket
import threading

import pytest

from certs import make_cert
from conftest import BACKEND_TOML, free_port, routes_toml, wait_for_log
from dovecotkit import PrivateDovecot
from test_submission import client_tls

ALICE, MOVED = "alice@example.test", "moved@example.test"
USERS = {ALICE: "correct horse", MOVED: "right password"}


def pymta_with_dovecot(make_server, dovecot: PrivateDovecot, timeout: str = "10s"):
    """pymta with a submission listener (STARTTLS, AUTH) whose checker is Dovecot."""
    srv = make_server("", start=False, server_toml="trusted_networks = []")
    cert, key = make_cert(srv.dir, "server")
    srv.sub_port = free_port()
    srv.config.write_text(srv.config.read_text() + f"""
[[listeners]]
name = "submission"
endpoint = "tcp:{srv.sub_port}:interface=127.0.0.1"
role = "submission"

[tls]
certificate = "{cert}"
key = "{key}"

[limits]
auth_failure_delay = 0.1

[stages]
auth = ["dovecot"]

[plugins.dovecot]
use = "dovecot"
socket = "{dovecot.auth_socket}"
timeout = "{timeout}"
penalty = false
""" + BACKEND_TOML + routes_toml(("*", "local")))
    return srv.start()


@pytest.fixture
def dovecot():
    kit = PrivateDovecot(USERS, extra_fields={MOVED: "nologin reason=moved_to_the_new_server"})
    yield kit.start()
    kit.cleanup()


def login(port: int, user: str, password: str, mechanism: str = "PLAIN") -> tuple[int, bytes]:
    """AUTH after STARTTLS; the reply code and text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("c.example")
        s.starttls(context=client_tls())
        s.ehlo("c.example")
        s.user, s.password = user, password
        method = s.auth_plain if mechanism == "PLAIN" else s.auth_login
        try:
            return s.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


def advertised(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("c.example")
        s.starttls(context=client_tls())
        s.ehlo("c.example")
        return s.esmtp_features.get("auth", "")


def test_right_and_wrong_passwords_plain_and_login(make_server, dovecot):
    srv = pymta_with_dovecot(make_server, dovecot)
    assert login(srv.sub_port, ALICE, "correct horse")[0] == 235
    assert login(srv.sub_port, ALICE, "correct horse", "LOGIN")[0] == 235
    assert login(srv.sub_port, ALICE, "wrong")[0] == 535
    assert login(srv.sub_port, "nobody@example.test", "whatever")[0] == 535
    wait_for_log(srv, rf"sasl_method=LOGIN, sasl_username={ALICE}")
    wait_for_log(srv, rf"SASL PLAIN authentication failed for user {ALICE}")
    # Dovecot was told where the client is, and that the session is encrypted (it refuses
    # plaintext mechanisms otherwise: disable_plaintext_auth = yes)
    log = dovecot.log_text()
    assert f"passwd-file({ALICE},127.0.0.1" in log
    assert "Plaintext authentication disabled" not in log


def test_a_nologin_user_is_refused_with_the_reason_logged(make_server, dovecot):
    srv = pymta_with_dovecot(make_server, dovecot)
    assert login(srv.sub_port, MOVED, "right password")[0] == 535
    wait_for_log(srv, rf"dovecot auth: {MOVED}: moved_to_the_new_server")


@pytest.mark.parametrize("offered", ["PLAIN", "LOGIN"])
def test_only_the_mechanisms_dovecot_offers_are_offered(make_server, offered):
    kit = PrivateDovecot(USERS, mechanisms=offered.lower()).start()
    try:
        srv = pymta_with_dovecot(make_server, kit)
        # the checker connects at start-up and reads Dovecot's MECH list (a login
        # waits for that handshake, so after one the list is known)
        assert login(srv.sub_port, ALICE, "correct horse", offered)[0] == 235
        assert advertised(srv.sub_port).split() == [offered]
        assert login(srv.sub_port, ALICE, "wrong", offered)[0] == 535
    finally:
        kit.cleanup()


def test_dovecot_down_gives_454_and_logins_work_again_when_it_is_back(make_server, dovecot):
    srv = pymta_with_dovecot(make_server, dovecot)
    assert login(srv.sub_port, ALICE, "correct horse")[0] == 235
    dovecot.stop()
    code, text = login(srv.sub_port, ALICE, "correct horse")
    assert (code, text[:5]) == (454, b"4.7.0")
    wait_for_log(srv, r"cannot connect to Dovecot's auth socket .*auth-client")
    assert login(srv.sub_port, ALICE, "wrong")[0] == 454      # not 535: nobody could check
    dovecot.start()
    assert login(srv.sub_port, ALICE, "correct horse")[0] == 235
    wait_for_log(srv, "dovecot auth: connected to .* again")


class _SilentSocket:
    """A UNIX socket that accepts connections and never says a word (a hung auth server)."""

    def __init__(self, path) -> None:
        self.auth_socket = path
        self.accepted: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self._listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self._listener.close()
        for conn in self.accepted:
            conn.close()


def test_a_server_that_never_finishes_the_handshake_is_left_and_tried_again(make_server, tmp_path):
    silent = _SilentSocket(tmp_path / "auth-client")
    try:
        srv = pymta_with_dovecot(make_server, silent, timeout="1s")
        assert login(srv.sub_port, ALICE, "correct horse")[0] == 454
        wait_for_log(srv, r"no handshake from Dovecot .*auth-client.* within 1s")
        assert login(srv.sub_port, ALICE, "correct horse")[0] == 454
        # each login opened a connection of its own: none waits on the hung one
        assert len(silent.accepted) >= 2
    finally:
        silent.close()
