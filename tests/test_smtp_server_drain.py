"""The sans-I/O server machine while the server stops (graceful SIGTERM).

``drain()``: a session with no transaction is closed with 421 4.3.2 at once;
one with a transaction in flight finishes it (its 250 or refusal) and is
closed then; nothing starts a new transaction.  ``shutdown()`` (the drain
deadline) closes whatever is left and discards a half-received message.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.smtp import events as E
from pymta.smtp._state import State
from pymta.verdict import Kind, Verdict
from smtp_driver import Driver, reply_codes

SHUTTING_DOWN = b"421 4.3.2 mx.test Service shutting down\r\n"
OK = b"250 2.0.0 Ok\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 2.0.0 Bye\r\n"
ENVELOPE = b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n"
CONTENT = b"Subject: drain\r\n\r\nline one\r\n..dot line\r\nline three\r\n"


def greeted(**kw) -> Driver:
    driver = Driver(**kw)
    assert driver.feed(b"EHLO client.test\r\n").startswith(b"250-mx.test\r\n")
    return driver


def drain(driver: Driver) -> bytes:
    start = len(driver.replies)
    driver.conn.drain()
    driver.pump()
    return bytes(driver.replies[start:])


# ------------------------------------------------------------ idle sessions
def test_an_idle_greeted_session_gets_421_at_once():
    driver = greeted()
    assert drain(driver) == SHUTTING_DOWN
    assert driver.closed and driver.last_sentinel is E.CLOSED


def test_a_session_before_ehlo_gets_421_at_once():
    driver = Driver()
    assert drain(driver) == SHUTTING_DOWN
    assert driver.closed


def test_a_session_before_its_banner_gets_421_instead_and_no_banner_later():
    driver = Driver(greet=False)
    assert drain(driver) == SHUTTING_DOWN
    driver.conn.send_greeting()          # the connect stage answers late: nothing more is sent
    driver.conn.refuse(Verdict(Kind.REJECT))
    assert driver.conn.data_to_send() == b""
    assert driver.closed


def test_an_idle_session_in_the_middle_of_a_sasl_exchange_gets_421():
    from pymta.smtp.server import Features
    driver = greeted(features=Features(auth_mechanisms=("PLAIN",), auth_plaintext=True))
    assert driver.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert drain(driver) == SHUTTING_DOWN
    assert driver.closed


def test_a_pending_ehlo_is_answered_then_the_session_closes():
    driver = Driver(auto=False)
    driver.feed(b"EHLO client.test\r\n")
    assert drain(driver) == b""                     # the decision is still out
    out = driver.answer()
    assert out.startswith(b"250-mx.test\r\n") and out.endswith(SHUTTING_DOWN)
    assert driver.closed


def test_drain_twice_and_after_close_does_nothing_more():
    driver = greeted()
    assert drain(driver) == SHUTTING_DOWN
    assert drain(driver) == b""
    driver.conn.shutdown()
    assert driver.conn.data_to_send() == b""


# ----------------------------------------------------- transactions in flight
def test_a_transaction_after_mail_finishes_and_then_the_session_closes():
    driver = greeted()
    assert driver.feed(b"MAIL FROM:<alice@a.test>\r\n") == MAIL_OK
    assert drain(driver) == b""
    assert not driver.closed
    assert driver.feed(b"RCPT TO:<bob@b.test>\r\n") == RCPT_OK
    assert driver.feed(b"DATA\r\n") == GO_AHEAD
    assert driver.feed(CONTENT + b".\r\n") == OK + SHUTTING_DOWN
    assert driver.closed
    assert driver.messages() == [("end", CONTENT.replace(b"\r\n..", b"\r\n."))]


def test_a_message_half_received_goes_on_and_gets_its_250():
    driver = greeted()
    driver.feed(ENVELOPE + b"DATA\r\n" + CONTENT[:20])
    assert driver.conn.in_data
    assert drain(driver) == b""
    assert driver.feed(CONTENT[20:]) == b""
    assert driver.feed(b".\r\n") == OK + SHUTTING_DOWN
    assert [outcome for outcome, _ in driver.messages()] == ["end"]


def test_a_message_waiting_for_its_spool_commit_gets_the_answer_then_421():
    driver = greeted()
    driver.auto = False
    driver.feed(ENVELOPE)
    driver.answer()
    driver.answer()
    driver.feed(b"DATA\r\n" + CONTENT + b".\r\n")
    assert driver.conn.awaiting_answer
    assert drain(driver) == b""
    assert driver.answer(Verdict.accept("Ok: queued as X")) == (
        b"250 2.0.0 Ok: queued as X\r\n" + SHUTTING_DOWN)
    assert driver.closed


def test_a_refused_message_ends_the_transaction_too():
    driver = greeted(policy={E.MessageEnd: Verdict(Kind.REJECT, 554, "5.7.1", "No")})
    driver.feed(ENVELOPE + b"DATA\r\n")
    drain(driver)
    assert driver.feed(CONTENT + b".\r\n") == b"554 5.7.1 No\r\n" + SHUTTING_DOWN
    assert driver.closed


def test_a_commit_failure_451_ends_the_transaction():
    driver = greeted(policy={E.MessageEnd: Verdict(Kind.DEFER, 451, "4.3.0", "queue file write error")})
    driver.feed(ENVELOPE + b"DATA\r\n")
    drain(driver)
    assert reply_codes(driver.feed(CONTENT + b".\r\n")) == [451, 421]


def test_a_pending_mail_decision_refused_closes_the_session():
    driver = greeted()
    driver.auto = False
    driver.feed(b"MAIL FROM:<alice@a.test>\r\n")
    assert drain(driver) == b""
    assert driver.answer(Verdict(Kind.REJECT, 550, "5.7.1", "No")) == b"550 5.7.1 No\r\n" + SHUTTING_DOWN


def test_a_pending_mail_decision_accepted_keeps_the_transaction_going():
    driver = greeted()
    driver.auto = False
    driver.feed(b"MAIL FROM:<alice@a.test>\r\n")
    drain(driver)
    assert driver.answer() == MAIL_OK
    assert driver.conn.state is State.MAIL and not driver.closed


def test_rset_ends_the_transaction_and_the_session():
    driver = greeted()
    driver.feed(ENVELOPE)
    drain(driver)
    assert driver.feed(b"RSET\r\n") == OK + SHUTTING_DOWN


def test_bdat_between_chunks_finishes():
    driver = greeted()
    driver.feed(ENVELOPE)
    assert driver.feed(b"BDAT 5\r\nhello") == b"250 2.0.0 Ok: 5 octets received\r\n"
    assert driver.conn.state is State.BDAT_MORE
    assert drain(driver) == b""
    assert driver.feed(b"BDAT 6 LAST\r\n world") == OK + SHUTTING_DOWN
    assert driver.messages() == [("end", b"hello world")]


def test_bdat_in_the_middle_of_a_chunk_finishes():
    driver = greeted()
    driver.feed(ENVELOPE + b"BDAT 11 LAST\r\nhello")
    assert driver.conn.state is State.BDAT_CHUNK
    assert drain(driver) == b""
    assert driver.feed(b" world") == OK + SHUTTING_DOWN


# ------------------------------------------------------- no new transaction
def test_a_command_pipelined_after_the_message_gets_421_and_starts_nothing():
    driver = greeted()
    driver.feed(ENVELOPE + b"DATA\r\n")
    drain(driver)
    out = driver.feed(CONTENT + b".\r\nMAIL FROM:<carol@c.test>\r\nRCPT TO:<bob@b.test>\r\n")
    assert out == OK + SHUTTING_DOWN
    assert len(driver.of(E.MailFrom)) == 1 and driver.closed


def test_quit_pipelined_after_the_message_is_answered_221():
    driver = greeted()
    driver.feed(ENVELOPE + b"DATA\r\n")
    drain(driver)
    assert driver.feed(CONTENT + b".\r\nQUIT\r\n") == OK + BYE
    assert driver.closed


# ------------------------------------------------------------- the deadline
def test_shutdown_at_the_deadline_discards_the_half_received_message():
    driver = greeted()
    driver.feed(ENVELOPE + b"DATA\r\n" + CONTENT[:20])
    drain(driver)
    driver.conn.shutdown()
    driver.pump()
    assert bytes(driver.replies).endswith(GO_AHEAD + SHUTTING_DOWN)
    assert [outcome for outcome, _ in driver.messages()] == ["aborted"]
    assert not driver.of(E.MessageEnd)
    assert driver.feed(CONTENT[20:] + b".\r\n") == b""    # nothing read after the close


def test_shutdown_while_the_commit_is_pending_drops_the_late_answer():
    driver = greeted()
    driver.auto = False
    driver.feed(ENVELOPE)
    driver.answer()
    driver.answer()
    driver.feed(b"DATA\r\n" + CONTENT + b".\r\n")
    drain(driver)
    driver.conn.shutdown()
    assert driver.conn.data_to_send() == SHUTTING_DOWN
    assert not driver.conn.awaiting_answer


# ------------------------------------------------------- every moment of it
FULL = ENVELOPE + b"DATA\r\n" + CONTENT + b".\r\n"


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=len(b"MAIL FROM:<alice@a.test>\r\n"), max_value=len(FULL) - 1),
       tail=st.sampled_from([b"", b"QUIT\r\n", b"NOOP\r\n"]))
def test_draining_at_any_byte_of_a_transaction_still_delivers_it(cut, tail):
    """Drained anywhere from its whole MAIL command to its last byte, the
    transaction gets exactly the replies it would have, then 421 (or 221 to a
    pipelined QUIT), and one complete message is passed on."""
    reference = greeted()
    expected = reference.feed(FULL)
    driver = greeted()
    first = driver.feed(FULL[:cut])
    drain(driver)
    rest = driver.feed(FULL[cut:] + tail)
    assert first + rest == expected + (BYE if tail == b"QUIT\r\n" else SHUTTING_DOWN)
    assert driver.messages() == reference.messages()
    assert driver.closed


def test_a_mail_command_only_half_received_is_no_transaction_yet():
    driver = greeted()
    assert driver.feed(b"MAIL FROM:<alice@a.te") == b""
    assert drain(driver) == SHUTTING_DOWN
    assert not driver.of(E.MailFrom)
