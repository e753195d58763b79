"""The SMTP delivery backends over real loopback sockets, against a scripted fake server.

Each test runs on its own reactor (tests/fakesmtp.py): the backend, its
connection pool and the fake server share it.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from fakesmtp import CLOSE, DEFAULT_EHLO, HANG, FakeSMTP, run_reactor, sleep
from relaykit import smarthost, spooled, statuses
from pymta.relay.protocol import CHUNK

NO_CHUNKING = [e for e in DEFAULT_EHLO if e != "CHUNKING"]


def deliver_all(backend, messages):
    return defer.gatherResults([backend.deliver(m, m.envelope.recipients) for m in messages])


# -- results ------------------------------------------------------------------------------

def test_each_recipient_gets_its_own_result(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor)
        server.on_rcpt("gone@remote.test", b"550 5.1.1 <gone@remote.test>: no such user\r\n")
        server.on_rcpt("full@remote.test", b"452 4.2.2 mailbox full\r\n")
        backend = smarthost(reactor, tmp_path, server.port_number)
        message = spooled(tmp_path, "ok@remote.test", "gone@remote.test", "full@remote.test")
        return backend.deliver(message, message.envelope.recipients).addCallback(
            lambda results: (results, server))

    results, server = run_reactor(test)
    assert statuses(results) == ["delivered", "failed", "deferred"]
    ok, gone, full = results
    assert ok.summary() == "250 2.0.0 Ok: queued as FAKE"
    assert gone.summary().startswith("550 5.1.1 host 127.0.0.1[127.0.0.1]:")
    assert gone.text.endswith("said: <gone@remote.test>: no such user (in reply to RCPT TO command)")
    assert gone.diagnostic == "smtp; 550 5.1.1 <gone@remote.test>: no such user"
    assert gone.remote_mta == "127.0.0.1"
    assert full.enhanced == "4.2.2"
    assert ok.relay.startswith("127.0.0.1[127.0.0.1]:")
    [received] = server.messages
    assert received.recipients == ["ok@remote.test"]
    assert received.content == b"Received: by test\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.mark.parametrize("where", ["MAIL", "DATA", "."])
def test_a_reply_to_the_whole_transaction_applies_to_everyone(tmp_path, where):
    def test(reactor):
        server = FakeSMTP(reactor, ehlo=NO_CHUNKING)
        server.on(where, b"554 5.7.1 rejected as spam\r\n")
        backend = smarthost(reactor, tmp_path, server.port_number)
        message = spooled(tmp_path, "a@remote.test", "b@remote.test")
        return backend.deliver(message, message.envelope.recipients)

    results = run_reactor(test)
    assert statuses(results) == ["failed", "failed"]
    assert all(r.code == 554 and "rejected as spam" in r.text for r in results)


# -- connections ------------------------------------------------------------------------------

def test_messages_share_a_connection_with_rset_between_and_quit_when_idle(tmp_path):
    @defer.inlineCallbacks
    def test(reactor):
        server = FakeSMTP(reactor)
        backend = smarthost(reactor, tmp_path, server.port_number, idle_timeout="0.2s")
        for n in range(3):
            message = spooled(tmp_path, f"u{n}@remote.test")
            results = yield backend.deliver(message, message.envelope.recipients)
            assert statuses(results) == ["delivered"]
        assert server.closed == 0
        yield sleep(reactor, 0.5)
        return server

    server = run_reactor(test)
    assert len(server.connections) == 1
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT",
                              "RSET", "MAIL", "RCPT", "BDAT", "QUIT"]
    assert server.closed == 1
    assert len(server.messages) == 3


def test_concurrency_per_destination_is_limited_and_connections_are_reused(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor)
        most = [0]

        def slow_mail(proto, line):      # answer MAIL late, so that deliveries overlap
            open_now = sum(1 for c in server.connections if c.transport.connected)
            most[0] = max(most[0], open_now)
            reactor.callLater(0.05, proto.send, b"250 2.1.0 Ok\r\n")
            proto.sender = line[10:].decode().split(" ")[0].strip("<>")
            proto.recipients, proto.rcpt_params = [], []
        server.on("MAIL", slow_mail)
        backend = smarthost(reactor, tmp_path, server.port_number, max_connections=2)
        messages = [spooled(tmp_path, f"u{n}@remote.test") for n in range(7)]
        return deliver_all(backend, messages).addCallback(lambda r: (r, server, most[0]))

    results, server, most = run_reactor(test)
    assert [statuses(r) for r in results] == [["delivered"]] * 7
    assert len(server.connections) == 2
    assert most == 2
    assert len(server.messages) == 7


def test_reuse_limit_opens_a_new_connection(tmp_path):
    @defer.inlineCallbacks
    def test(reactor):
        server = FakeSMTP(reactor)
        backend = smarthost(reactor, tmp_path, server.port_number, reuse_limit=2)
        for n in range(4):
            message = spooled(tmp_path, f"u{n}@remote.test")
            yield backend.deliver(message, message.envelope.recipients)
        return server

    server = run_reactor(test)
    assert len(server.connections) == 2
    assert server.verbs().count("QUIT") >= 1


def test_recipients_are_split_into_transactions_of_max_recipients(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor)
        backend = smarthost(reactor, tmp_path, server.port_number, max_recipients=2)
        message = spooled(tmp_path, *[f"u{n}@remote.test" for n in range(5)])
        return backend.deliver(message, message.envelope.recipients).addCallback(
            lambda r: (r, server))

    results, server = run_reactor(test)
    assert statuses(results) == ["delivered"] * 5
    assert [m.recipients for m in server.messages] == [
        ["u0@remote.test", "u1@remote.test"], ["u2@remote.test", "u3@remote.test"], ["u4@remote.test"]]


def test_a_connection_closed_while_idle_is_replaced_without_losing_the_message(tmp_path):
    @defer.inlineCallbacks
    def test(reactor):
        server = FakeSMTP(reactor)
        backend = smarthost(reactor, tmp_path, server.port_number, idle_timeout="10s")
        first = spooled(tmp_path, "a@remote.test")
        yield backend.deliver(first, first.envelope.recipients)
        # the server drops the connection the moment the next transaction starts
        server.on("RSET", CLOSE)
        second = spooled(tmp_path, "b@remote.test")
        results = yield backend.deliver(second, second.envelope.recipients)
        backend.close()
        return results, server

    results, server = run_reactor(test)
    assert statuses(results) == ["delivered"]
    assert len(server.connections) == 2
    assert [m.recipients for m in server.messages] == [["a@remote.test"], ["b@remote.test"]]


# -- bad servers: deferred, never lost, never delivered -----------------------------------------

def split_reply(proto, line):
    """A multi-line reply in four packets, 20 ms apart."""
    pieces = [b"250-2.1.5 first line of", b" a reply\r\n250-2.1.5 second", b"\r\n250 2.1",
              b".5 last line\r\n"]
    for n, piece in enumerate(pieces):
        proto.server.reactor.callLater(0.02 * n, proto.send, piece)
    proto.recipients.append(line[8:].decode().split(" ")[0].strip("<>"))
    proto.rcpt_params.append("")


def garbage(proto, line):
    proto.send(b"Hello, I am not an SMTP server\r\n")


def multiline_code_change(proto, line):
    proto.send(b"250-ok\r\n354 surprise\r\n")


@pytest.mark.parametrize("verb, action, expected", [
    ("RCPT", garbage, "protocol error"),
    ("MAIL", multiline_code_change, "protocol error"),
    ("RCPT", CLOSE, "lost connection"),
    ("DATA", CLOSE, "lost connection"),
    (".", CLOSE, "lost connection"),
    (".", HANG, "timed out while waiting for the reply to end of DATA"),
    ("RCPT", HANG, "timed out while waiting for the reply to RCPT TO"),
    ("MAIL", b"421 4.3.2 shutting down\r\n", "421"),
])
def test_a_misbehaving_server_defers_the_message(tmp_path, verb, action, expected):
    def test(reactor):
        server = FakeSMTP(reactor, ehlo=NO_CHUNKING)
        server.on(verb, action)
        backend = smarthost(reactor, tmp_path, server.port_number, data_done_timeout="0.5s",
                            rcpt_timeout="0.5s")
        message = spooled(tmp_path, "a@remote.test", "b@remote.test")
        return backend.deliver(message, message.envelope.recipients).addCallback(
            lambda r: (r, server))

    results, server = run_reactor(test)
    assert statuses(results) == ["deferred", "deferred"]
    assert all(expected in r.summary() for r in results), results[0].summary()
    assert server.messages == [] or verb == "."     # "." closed/hung: the server may have it


@pytest.mark.parametrize("greeting, expected", [
    (HANG, "timed out while waiting for the initial server greeting"),
    (b"421 4.7.0 too busy\r\n", "refused to talk to me: 421 4.7.0 too busy"),
    (b"554 5.7.1 go away\r\n", "refused to talk to me: 554 5.7.1 go away"),
    (CLOSE, "lost connection"),
])
def test_a_server_that_will_not_talk_defers(tmp_path, greeting, expected):
    def test(reactor):
        server = FakeSMTP(reactor)
        server.greeting = greeting
        backend = smarthost(reactor, tmp_path, server.port_number, greeting_timeout="0.3s")
        message = spooled(tmp_path, "a@remote.test")
        return backend.deliver(message, message.envelope.recipients)

    [result] = run_reactor(test)
    assert result.status == "deferred"
    assert result.code // 100 == 4 and result.enhanced.startswith("4.")
    assert expected in result.text


def test_nothing_listening_defers_with_the_connect_error(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor)
        port = server.port_number
        backend = smarthost(reactor, tmp_path, port)
        message = spooled(tmp_path, "a@remote.test")
        return server.stop().addCallback(
            lambda _: backend.deliver(message, message.envelope.recipients))

    [result] = run_reactor(test)
    assert result.status == "deferred"
    assert "Connection refused" in result.text and result.enhanced == "4.4.1"


def test_a_reply_split_across_packets_is_read_whole(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor)
        server.on("RCPT", split_reply)
        backend = smarthost(reactor, tmp_path, server.port_number)
        message = spooled(tmp_path, "a@remote.test")
        return backend.deliver(message, message.envelope.recipients)

    assert statuses(run_reactor(test)) == ["delivered"]


# -- content -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ehlo", [NO_CHUNKING, DEFAULT_EHLO], ids=["DATA", "BDAT"])
def test_content_arrives_byte_for_byte_with_dot_lines_at_every_offset_around_the_read_size(
        tmp_path, ehlo):
    prepend = "Received: by test\r\n"
    bodies = []
    for offset in range(CHUNK - 5, CHUNK + 5):
        at = offset - len(prepend)
        bodies.append(b"Subject: dots\r\n\r\n" + b"y" * (at - 19) + b"\r\n.\r\n..\r\n.x\r\nend\r\n")
    bodies.append(b".\r\nstarts with a dot\r\n")
    bodies.append(b"no final line break")

    @defer.inlineCallbacks
    def test(reactor):
        server = FakeSMTP(reactor, ehlo=ehlo)
        backend = smarthost(reactor, tmp_path, server.port_number)
        for body in bodies:
            message = spooled(tmp_path, "a@remote.test", body=body, prepend=(prepend,))
            results = yield backend.deliver(message, message.envelope.recipients)
            assert statuses(results) == ["delivered"]
        return server

    server = run_reactor(test)
    assert len(server.messages) == len(bodies)
    for body, received in zip(bodies, server.messages):
        expected = prepend.encode() + body
        if received.via == "DATA" and not expected.endswith(b"\r\n"):
            expected += b"\r\n"                   # DATA needs the final line break
        assert received.content == expected
        assert received.via == ("BDAT" if "CHUNKING" in ehlo else "DATA")


def test_closing_at_shutdown_defers_waiting_and_aborts_busy_deliveries(tmp_path):
    def test(reactor):
        server = FakeSMTP(reactor, ehlo=NO_CHUNKING)
        server.on(".", HANG)
        backend = smarthost(reactor, tmp_path, server.port_number, max_connections=1)
        messages = [spooled(tmp_path, f"u{n}@remote.test") for n in range(3)]
        d = deliver_all(backend, messages)
        reactor.callLater(0.3, backend.close, 0.2)
        return d

    results = run_reactor(test)
    assert [statuses(r) for r in results] == [["deferred"]] * 3
    busy, *waiting = results
    assert "pymta is shutting down" in busy[0].text
    assert all(r[0].summary() == "451 4.3.2 pymta is shutting down" for r in waiting)


def test_an_unreachable_destination_is_not_tried_again_for_a_while_unless_flushed(tmp_path):
    @defer.inlineCallbacks
    def test(reactor):
        server = FakeSMTP(reactor)
        server.greeting = b"421 4.3.2 not now\r\n"
        backend = smarthost(reactor, tmp_path, server.port_number, dead_destination_time="1m")
        first = spooled(tmp_path, "a@remote.test")
        results = [(yield backend.deliver(first, first.envelope.recipients))]
        for n in range(3):
            message = spooled(tmp_path, f"b{n}@remote.test")
            results.append((yield backend.deliver(message, message.envelope.recipients)))
        tried_before_flush = len(server.connections)
        backend.forget_failures()                     # what ETRN does
        last = spooled(tmp_path, "c@remote.test")
        results.append((yield backend.deliver(last, last.envelope.recipients)))
        return results, tried_before_flush, len(server.connections)

    results, before_flush, after_flush = run_reactor(test)
    assert [statuses(r) for r in results] == [["deferred"]] * 5
    assert all("refused to talk to me: 421 4.3.2 not now" in r[0].text for r in results)
    assert (before_flush, after_flush) == (1, 2)


@pytest.mark.parametrize("ehlo", [NO_CHUNKING, DEFAULT_EHLO], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("prepend", [(), ("Received: by test\r\n",)], ids=["bare", "prepended"])
def test_a_large_message_streams_from_the_spool_unchanged(tmp_path, ehlo, prepend):
    body = b"Subject: big\r\n\r\n" + b"".join(b".%06d line of the body\r\n" % n for n in range(12000))

    def test(reactor):
        server = FakeSMTP(reactor, ehlo=ehlo)
        backend = smarthost(reactor, tmp_path, server.port_number)
        message = spooled(tmp_path, "a@remote.test", body=body, prepend=prepend)
        return backend.deliver(message, message.envelope.recipients).addCallback(
            lambda r: (r, server))

    results, server = run_reactor(test)
    assert statuses(results) == ["delivered"]
    assert len(body) > 3 * CHUNK
    assert server.messages[0].content == "".join(prepend).encode() + body
