"""The Dovecot auth protocol client, byte for byte: no sockets, no reactor."""

from __future__ import annotations

import pytest

from pymta.auth.dovecot_protocol import (AuthClientConnection, AuthProtocolError, AuthRequest,
                                         Continue, Handshake, Result, escape, plain_response,
                                         unescape)

HANDSHAKE = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tlogin\tplaintext\n"
             b"MECH\tCRAM-MD5\tdictionary\tactive\nSPID\t77\nCUID\t3\nCOOKIE\tabc\nDONE\n")


def ready() -> AuthClientConnection:
    conn = AuthClientConnection(pid=4242)
    assert conn.data_to_send() == b"VERSION\t1\t2\nCPID\t4242\n"
    conn.receive_data(HANDSHAKE)
    assert isinstance(conn.next_event(), Handshake)
    return conn


def events(conn: AuthClientConnection) -> list:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def test_handshake_in_any_cuts_gives_version_and_mechanisms():
    conn = AuthClientConnection(pid=1)
    conn.data_to_send()
    for i in range(len(HANDSHAKE)):
        conn.receive_data(HANDSHAKE[i:i + 1])
    (handshake,) = events(conn)
    assert handshake.version == (1, 2)
    assert handshake.mechanisms == {"PLAIN": ("plaintext",), "LOGIN": ("plaintext",),
                                    "CRAM-MD5": ("dictionary", "active")}


def test_another_major_version_is_refused():
    conn = AuthClientConnection(pid=1)
    with pytest.raises(AuthProtocolError, match="version 2.0"):
        conn.receive_data(b"VERSION\t2\t0\n")


def test_auth_before_the_handshake_is_a_bug():
    with pytest.raises(AuthProtocolError):
        AuthClientConnection(pid=1).request(1, AuthRequest("PLAIN", b""))


def test_auth_plain_line_with_addresses_secured_and_the_initial_response():
    conn = ready()
    conn.request(7, AuthRequest("plain", plain_response("alice@example.test", "pw"),
                                local_ip="192.0.2.1", local_port=587, remote_ip="198.51.100.7",
                                remote_port=40000, secured=True, no_penalty=True))
    assert conn.data_to_send() == (b"AUTH\t7\tPLAIN\tservice=smtp\tlip=192.0.2.1\trip=198.51.100.7"
                                   b"\tlport=587\trport=40000\tsecured\tno-penalty"
                                   b"\tresp=AGFsaWNlQGV4YW1wbGUudGVzdABwdw==\n")


def test_auth_login_steps_go_as_cont():
    conn = ready()
    conn.request(2, AuthRequest("LOGIN", None))
    assert conn.data_to_send() == b"AUTH\t2\tLOGIN\tservice=smtp\n"
    conn.receive_data(b"CONT\t2\tVXNlcm5hbWU6\n")
    assert events(conn) == [Continue(2, b"Username:")]
    conn.respond(2, b"alice")
    assert conn.data_to_send() == b"CONT\t2\tYWxpY2U=\n"


def test_ok_fail_temp_and_nologin_replies():
    conn = ready()
    conn.receive_data(b"OK\t1\tuser=alice@example.test\n"
                      b"FAIL\t2\tuser=bob\n"
                      b"FAIL\t3\ttemp\treason=database\001tdown\n"
                      b"FAIL\t4\tcode=temp_fail\n"
                      b"OK\t5\tuser=carol\tnologin\treason=moved\n"
                      b"NOTICE\tsomething new\n")
    ok, fail, temp, temp_code, nologin = events(conn)
    assert ok == Result(1, True, user="alice@example.test", fields={"user": "alice@example.test"})
    assert not fail.ok and not fail.temporary and fail.user == "bob"
    assert temp.temporary and temp.reason == "database\tdown"
    assert temp_code.temporary
    assert nologin.ok and nologin.nologin and nologin.reason == "moved"


def test_garbage_replies_are_protocol_errors():
    conn = ready()
    with pytest.raises(AuthProtocolError):
        conn.receive_data(b"OK\tnot-a-number\n")
    with pytest.raises(AuthProtocolError):
        ready().receive_data(b"x" * 20000)


@pytest.mark.parametrize("text", ["plain", "tab\there", "nl\nand\rcr", "nul\0", "esc\001ape"])
def test_escape_round_trip(text):
    assert "\t" not in escape(text) and "\n" not in escape(text)
    assert unescape(escape(text)) == text
