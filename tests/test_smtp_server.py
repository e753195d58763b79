"""The sans-I/O SMTP server state machine, command by command, byte for byte.

Message content (DATA, BDAT, smuggling, size and line rules) is in
test_smtp_body.py; the path and parameter grammar in test_smtp_address.py.
"""

from __future__ import annotations

import re

import pytest

from pymta.smtp import events as E
from pymta.smtp._state import State
from pymta.smtp.server import (MAX_COMMAND_LINE, MAX_MAIL_LINE, MAX_RCPT_LINE, Features,
                               ProtocolLimits, ServerConnection)
from pymta.verdict import Kind, Verdict
from smtp_driver import Driver, reply_codes, reply_lines, session

GREETING = b"220 mx.test ESMTP pymta\r\n"
EHLO_REPLY = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
              b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 DSN\r\n")
OK = b"250 2.0.0 Ok\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 2.0.0 Bye\r\n"
UNRECOGNIZED = b"500 5.5.2 Error: command not recognized\r\n"
LINE_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
BARE_NEWLINE = b"500 5.5.2 Error: bare <CR> or <LF> in command; lines must end with <CR><LF>\r\n"
NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"
NO_RCPT = b"554 5.5.1 Error: no valid recipients\r\n"


def greeted(limits: ProtocolLimits | None = None, **kw) -> Driver:
    driver = Driver(limits, **kw)
    assert driver.feed(b"EHLO client.test\r\n").startswith(b"250-mx.test\r\n")
    return driver


def in_transaction(limits: ProtocolLimits | None = None, **kw) -> Driver:
    driver = greeted(limits, **kw)
    assert driver.feed(b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n") == MAIL_OK + RCPT_OK
    return driver


# ------------------------------------------------------------- greeting
def test_greeting_is_the_first_thing_sent():
    driver = Driver()
    assert bytes(driver.replies) == GREETING
    assert driver.conn.state is State.READY
    assert driver.pump() is E.NEED_DATA


def test_client_that_talks_before_the_greeting_is_refused_and_closed():
    conn = ServerConnection("mx.test", ProtocolLimits(pregreet_wait=1.0))
    conn.receive_data(b"EHLO early.test\r\n")
    assert conn.next_event() is E.NEED_DATA      # nothing is parsed before the banner
    conn.send_greeting()
    assert conn.data_to_send() == (
        b"554 5.5.1 Error: SMTP protocol synchronization (talked before greeting)\r\n")
    assert conn.next_event() is E.CLOSED
    assert conn.closed


def test_without_the_pregreet_trap_early_bytes_wait_for_the_greeting():
    """pregreet_wait = 0: the banner may still come late (the client's name is
    looked up first); what the client sent meanwhile is answered after it."""
    conn = ServerConnection("mx.test", ProtocolLimits())
    conn.receive_data(b"EHLO early.test\r\n")
    assert conn.next_event() is E.NEED_DATA
    conn.send_greeting()
    assert conn.data_to_send() == b"220 mx.test ESMTP pymta\r\n"
    assert not conn.closed


def test_greeting_twice_is_a_programming_error():
    conn = ServerConnection("mx.test")
    conn.send_greeting()
    with pytest.raises(RuntimeError):
        conn.send_greeting()


@pytest.mark.parametrize("verdict, expected", [
    (Verdict.reject("Go away"), b"550 5.7.1 Go away\r\n"),
    (Verdict(Kind.REJECT), b"554 5.7.1 Service unavailable\r\n"),
    (Verdict(Kind.DEFER), b"421 4.7.1 Service temporarily unavailable\r\n"),
    (Verdict.defer("Busy", 450, "4.3.2"), b"450 4.3.2 Busy\r\n"),
])
def test_connect_stage_refusal_replies_and_closes(verdict, expected):
    conn = ServerConnection("mx.test")
    conn.refuse(verdict)
    assert conn.data_to_send() == expected
    assert conn.next_event() is E.CLOSED


# ------------------------------------------------------------ HELO/EHLO
def test_ehlo_lists_exactly_the_offered_extensions():
    driver = Driver()
    assert driver.feed(b"EHLO client.test\r\n") == EHLO_REPLY
    assert driver.events == [E.Hello("EHLO", "client.test")]
    assert driver.conn.esmtp and driver.conn.helo == "client.test"


def test_ehlo_advertises_the_configured_size_and_extra_extensions():
    driver = Driver(ProtocolLimits(max_message_size=1000))
    driver.conn.features = Features(starttls=True)
    assert driver.feed(b"ehlo client.test\r\n") == (
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n250 STARTTLS\r\n")


def test_helo_replies_with_the_hostname_only():
    driver = Driver()
    assert driver.feed(b"HELO client.test\r\n") == b"250 mx.test\r\n"
    assert driver.events == [E.Hello("HELO", "client.test")]
    assert not driver.conn.esmtp


@pytest.mark.parametrize("line, verb", [(b"EHLO\r\n", "EHLO"), (b"HELO \r\n", "HELO"),
                                        (b"EHLO two words\r\n", "EHLO")])
def test_hello_without_a_single_hostname_is_a_syntax_error(line, verb):
    driver = Driver()
    assert driver.feed(line) == f"501 5.5.4 Syntax: {verb} hostname\r\n".encode()
    assert driver.events == []
    assert driver.feed(b"MAIL FROM:<a@b.test>\r\n") == NEED_HELO


def test_second_ehlo_resets_the_transaction():
    driver = in_transaction()
    assert driver.feed(b"EHLO again.test\r\n") == EHLO_REPLY
    assert driver.conn.recipients == [] and driver.conn.sender is None
    assert driver.feed(b"DATA\r\n") == NEED_MAIL


# ----------------------------------------------------- simple commands
def test_noop_rset_vrfy_help_quit_byte_for_byte():
    driver = greeted()
    assert session(driver, b"NOOP\r\n", b"noop anything\r\n", b"RSET\r\n", b"VRFY alice\r\n",
                   b"HELP\r\n", b"HELP MAIL\r\n", b"QUIT\r\n") == [
        OK, OK, OK,
        b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
        b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT\r\n",
        b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT\r\n",
        BYE]
    assert driver.events[-1] == E.Quit()
    assert driver.closed and driver.last_sentinel is E.CLOSED


def test_commands_that_need_no_greeting_work_before_ehlo():
    driver = Driver()
    assert session(driver, b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n", b"QUIT\r\n") == [
        OK, OK, b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n", BYE]


def test_quit_ends_the_session_and_later_bytes_are_ignored():
    driver = greeted()
    assert driver.feed(b"QUIT\r\nNOOP\r\n") == BYE
    assert driver.feed(b"NOOP\r\n") == b""
    assert driver.conn.next_event() is E.CLOSED


def test_quit_during_a_chunked_transaction_aborts_the_message():
    driver = in_transaction()
    assert driver.feed(b"BDAT 3\r\nabcQUIT\r\n") == b"250 2.0.0 Ok: 3 octets received\r\n" + BYE
    assert driver.events[-2:] == [E.MessageAborted("QUIT"), E.Quit()]


@pytest.mark.parametrize("line, reply", [
    (b"RSET now\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
    (b"VRFY\r\n", b"501 5.5.4 Syntax: VRFY address\r\n"),
    (b"DATA now\r\n", b"501 5.5.4 Syntax: DATA\r\n"),
    (b"RCPT FROM:<a@b.test>\r\n", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
    (b"RCPT TO:\r\n", b"501 5.1.3 Syntax: the address must be enclosed in <>\r\n"),
])
def test_bad_syntax_is_501(line, reply):
    driver = in_transaction()
    assert driver.feed(line) == reply
    assert driver.feed(b"NOOP\r\n") == OK


@pytest.mark.parametrize("line, reply", [
    (b"MAIL TO:<a@b.test>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL FROM:a@b.test\r\n", b"501 5.1.7 Syntax: the address must be enclosed in <>\r\n"),
])
def test_bad_mail_syntax_is_501(line, reply):
    driver = greeted()
    assert driver.feed(line) == reply
    assert driver.feed(b"NOOP\r\n") == OK


@pytest.mark.parametrize("line", [b"FOO\r\n", b"\r\n", b"MAILFROM:<a@b.test>\r\n", b"NOOP\tx\r\n",
                                  b"HELLO x\r\n"])
def test_unknown_commands_are_500(line):
    driver = greeted()
    assert driver.feed(line) == UNRECOGNIZED
    assert driver.feed(b"NOOP\r\n") == OK


@pytest.mark.parametrize("verb", [b"EXPN list", b"TURN", b"ETRN example.test", b"STARTTLS",
                                  b"AUTH PLAIN"])
def test_recognised_but_not_offered_commands_are_502(verb):
    driver = greeted()
    assert driver.feed(verb + b"\r\n") == b"502 5.5.1 Error: command not implemented\r\n"


def test_commands_are_case_insensitive():
    driver = Driver()
    assert session(driver, b"ehlo client.test\r\n", b"mail from:<a@b.test>\r\n",
                   b"Rcpt To:<c@d.test>\r\n", b"data\r\n", b"x\r\n.\r\n", b"quit\r\n") == [
        EHLO_REPLY, MAIL_OK, RCPT_OK, GO_AHEAD, OK, BYE]


# ------------------------------------------------------- bad sequence
def test_mail_before_ehlo_is_503():
    driver = Driver()
    assert driver.feed(b"MAIL FROM:<a@b.test>\r\n") == NEED_HELO
    assert driver.events == []


def test_rcpt_and_data_before_mail_are_503():
    driver = greeted()
    assert session(driver, b"RCPT TO:<a@b.test>\r\n", b"DATA\r\n") == [NEED_MAIL, NEED_MAIL]
    assert Driver().feed(b"RCPT TO:<a@b.test>\r\n") == NEED_MAIL


def test_nested_mail_is_503():
    driver = greeted()
    assert session(driver, b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<c@d.test>\r\n") == [
        MAIL_OK, NESTED_MAIL]
    assert driver.feed(b"RCPT TO:<x@y.test>\r\n") == RCPT_OK
    assert driver.feed(b"MAIL FROM:<c@d.test>\r\n") == NESTED_MAIL
    assert driver.conn.sender == "a@b.test"


def test_data_without_recipients_is_554():
    driver = greeted()
    assert session(driver, b"MAIL FROM:<a@b.test>\r\n", b"DATA\r\n") == [MAIL_OK, NO_RCPT]
    assert not driver.of(E.MessageStart)


def test_rset_ends_the_transaction_but_keeps_the_greeting():
    driver = in_transaction()
    assert session(driver, b"RSET\r\n", b"RCPT TO:<c@d.test>\r\n", b"MAIL FROM:<c@d.test>\r\n") == [
        OK, NEED_MAIL, MAIL_OK]


def test_rset_before_the_greeting_does_not_greet():
    driver = Driver()
    assert session(driver, b"RSET\r\n", b"MAIL FROM:<a@b.test>\r\n") == [OK, NEED_HELO]


# ----------------------------------------------------- enhanced codes
ENHANCED = re.compile(rb"(\d)\d\d[ -](\d)\.\d{1,3}\.\d{1,3}( |\Z)")


def test_every_reply_but_greeting_ehlo_helo_and_354_has_an_enhanced_code():
    driver = Driver(ProtocolLimits(max_recipients=1), policy={
        E.RcptTo: lambda ev: Verdict(Kind.REJECT) if ev.recipient.startswith("no") else None})
    replies = session(
        driver, b"NOOP\r\n", b"MAIL FROM:<a@b.test>\r\n", b"HELO c.test\r\n", b"EHLO c.test\r\n",
        b"RCPT TO:<a@b.test>\r\n", b"DATA\r\n", b"MAIL FROM:<a@b.test> SIZE=x\r\n",
        b"MAIL FROM:<a@b.test> FOO\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<no@b.test>\r\n",
        b"RCPT TO:<ok@b.test>\r\n", b"RCPT TO:<two@b.test>\r\n", b"DATA\r\n", b"hi\r\n.\r\n",
        b"BDAT 1\r\nx", b"FOO\r\n", b"NOOP\n", b"VRFY x\r\n", b"HELP\r\n", b"EXPN x\r\n",
        b"NOOP " + b"x" * 600 + b"\r\n", b"QUIT\r\n")
    unmarked = {b"250 mx.test", b"250-mx.test", GO_AHEAD[:-2]}
    checked = 0
    for line in reply_lines(b"".join(replies)):
        if line in unmarked or line.startswith(b"250-") or line == b"250 DSN":
            continue
        match = ENHANCED.match(line)
        assert match, line
        assert match.group(1) == match.group(2), line      # same class as the reply code
        checked += 1
    assert checked == 19
    assert not ENHANCED.match(bytes(driver.replies).split(b"\r\n")[0])


# ------------------------------------------------------- recipients
def test_too_many_recipients_is_452_and_the_session_goes_on():
    driver = greeted(ProtocolLimits(max_recipients=2))
    assert session(driver, b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<r1@b.test>\r\n",
                   b"RCPT TO:<r2@b.test>\r\n", b"RCPT TO:<r3@b.test>\r\n",
                   b"RCPT TO:<r4@b.test>\r\n", b"DATA\r\n", b"body\r\n.\r\n") == [
        MAIL_OK, RCPT_OK, RCPT_OK, b"452 4.5.3 Error: too many recipients\r\n",
        b"452 4.5.3 Error: too many recipients\r\n", GO_AHEAD, OK]
    assert [e.recipient for e in driver.of(E.RcptTo)] == ["r1@b.test", "r2@b.test"]
    assert driver.of(E.MessageEnd) == [E.MessageEnd(6)]


def test_accepted_recipients_keep_their_parameters():
    driver = in_transaction()
    driver.auto = False
    driver.feed(b"RCPT TO:<carol@c.test> NOTIFY=NEVER\r\n")
    assert driver.answer(Verdict.accept()) == RCPT_OK
    assert driver.conn.recipients == [("bob@b.test", {}),
                                      ("carol@c.test", {"NOTIFY": ("NEVER",)})]


# ------------------------------------------------------------ errors
def test_too_many_errors_gives_421_and_closes():
    driver = greeted(ProtocolLimits(max_errors=3))
    out = driver.feed(b"FOO\r\nBAR\r\nRCPT TO:<a@b.test>\r\nNOOP\r\nQUIT\r\n")
    assert out == UNRECOGNIZED * 2 + NEED_MAIL + b"421 4.7.0 mx.test Error: too many errors\r\n"
    assert driver.closed and driver.last_sentinel is E.CLOSED
    assert driver.events[-1] == E.Hello("EHLO", "client.test")   # nothing after was run


def test_policy_refusals_count_towards_the_error_limit():
    driver = greeted(ProtocolLimits(max_errors=2), policy={E.RcptTo: Verdict.reject()})
    out = driver.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@b.test>\r\nRCPT TO:<y@b.test>\r\n")
    assert out == MAIL_OK + b"550 5.7.1 Rejected\r\n" * 2 + b"421 4.7.0 mx.test Error: too many errors\r\n"
    assert driver.closed


def test_too_many_errors_during_a_message_aborts_it():
    driver = in_transaction(ProtocolLimits(max_errors=1, bare_newlines="reject"))
    out = driver.feed(b"DATA\r\nbare\nline\r\n.\r\n")
    assert out == GO_AHEAD + (b"550 5.6.11 Error: message contains bare <CR> or <LF>; "
                              b"lines must end with <CR><LF>\r\n"
                              b"421 4.7.0 mx.test Error: too many errors\r\n")
    assert len(driver.of(E.MessageAborted)) == 1 and not driver.of(E.MessageEnd)


# --------------------------------------------------------- pipelining
def test_a_whole_pipelined_session_is_answered_in_order():
    driver = Driver(policy={E.RcptTo: lambda ev: Verdict.reject() if ev.recipient == "no@b.test" else None})
    out = driver.feed(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<no@b.test>\r\n"
                      b"RCPT TO:<yes@b.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
                      b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nBDAT 4 LAST\r\nbodyRSET\r\nQUIT\r\n")
    assert out == (EHLO_REPLY + MAIL_OK + b"550 5.7.1 Rejected\r\n" + RCPT_OK + GO_AHEAD + OK
                   + MAIL_OK + RCPT_OK + OK + OK + BYE)
    assert [type(e) for e in driver.events] == [
        E.Hello, E.MailFrom, E.RcptTo, E.RcptTo, E.MessageStart, E.MessageData, E.MessageEnd,
        E.MailFrom, E.RcptTo, E.MessageStart, E.MessageData, E.MessageEnd, E.Quit]
    assert driver.messages() == [("end", b"Subject: x\r\n\r\nbody\r\n"), ("end", b"body")]


def test_nothing_is_parsed_while_a_decision_is_pending():
    driver = Driver(auto=False)
    out = driver.feed(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nFOO\r\nQUIT\r\n")
    assert out == b""
    assert driver.events == [E.Hello("EHLO", "client.test")]
    assert driver.last_sentinel is E.PAUSED
    assert driver.conn.awaiting_answer
    for _ in range(3):
        assert driver.conn.next_event() is E.PAUSED
    assert driver.feed(b"NOOP\r\n") == b""              # more input: still nothing
    assert driver.answer() == EHLO_REPLY                # the MAIL behind it is parsed now
    assert driver.events[-1] == E.MailFrom("a@b.test", {})
    assert driver.last_sentinel is E.PAUSED
    assert driver.answer() == MAIL_OK + UNRECOGNIZED + BYE
    assert driver.closed
    # the NOOP that came after QUIT was never run
    assert driver.events[-1] == E.Quit()


def test_answers_can_come_later_after_more_input():
    driver = Driver(auto=False)
    driver.feed(b"EHLO client.test\r\n")
    driver.feed(b"MAIL FROM:<a@b.test>\r\n")
    driver.feed(b"RCPT TO:<c@d.test>\r\nDA")
    assert bytes(driver.replies) == GREETING
    assert driver.answer() == EHLO_REPLY
    driver.feed(b"TA\r\nhello\r\n")
    assert driver.answer() == MAIL_OK
    assert driver.answer() == RCPT_OK + GO_AHEAD
    assert driver.feed(b".\r\n") == b""
    assert driver.events[-1] == E.MessageEnd(7)
    assert driver.answer(Verdict.accept("Ok: queued as 4711")) == b"250 2.0.0 Ok: queued as 4711\r\n"
    assert driver.messages() == [("end", b"hello\r\n")]


def test_answer_without_a_pending_decision_is_a_programming_error():
    driver = greeted()
    with pytest.raises(RuntimeError):
        driver.conn.answer(Verdict.accept())


# ----------------------------------------------------------- verdicts
STAGES = {
    # stage: (commands up to the decision, its event, the default refusal)
    "hello": (b"EHLO client.test\r\n", E.Hello, b"550 5.7.1 Rejected\r\n"),
    "mail": (b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n", E.MailFrom,
             b"550 5.7.1 Sender address rejected\r\n"),
    "rcpt": (b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n", E.RcptTo,
             b"550 5.1.1 Recipient address rejected\r\n"),
    "message": (b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
                b"DATA\r\nhello\r\n.\r\n", E.MessageEnd, b"554 5.7.1 Message rejected\r\n"),
}
ACCEPTED = {"hello": EHLO_REPLY, "mail": MAIL_OK, "rcpt": RCPT_OK, "message": OK}


def run_to_decision(stage: str, verdict: Verdict) -> tuple[Driver, bytes]:
    commands, event_class, _ = STAGES[stage]
    driver = Driver(policy={event_class: verdict})
    out = driver.feed(commands)
    assert len(driver.of(event_class)) == 1
    if stage == "hello":
        return driver, out
    return driver, out[out.rfind(b"\r\n", 0, len(out) - 2) + 2:]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("verdict, expected", [
    (Verdict(Kind.DEFER), b"451 4.7.1 Try again later\r\n"),
    (Verdict.defer(), b"451 4.7.1 Try again later\r\n"),
    (Verdict.defer("Greylisted, come back later", 450, "4.7.26"),
     b"450 4.7.26 Greylisted, come back later\r\n"),
    (Verdict(Kind.DEFER, code=452), b"452 4.7.1 Try again later\r\n"),
    (Verdict.reject("Nope", 554, "5.7.9"), b"554 5.7.9 Nope\r\n"),
    (Verdict(Kind.REJECT, text="Custom text"), None),
])
def test_refusals_at_each_decision(stage, verdict, expected):
    default = STAGES[stage][2]
    if expected is None:
        expected = default[:10] + b"Custom text\r\n"
    driver, last = run_to_decision(stage, verdict)
    assert last == expected
    assert not driver.closed


@pytest.mark.parametrize("stage", STAGES)
def test_default_rejection_text_of_each_decision(stage):
    driver, last = run_to_decision(stage, Verdict(Kind.REJECT))
    assert last == STAGES[stage][2]


@pytest.mark.parametrize("stage", STAGES)
def test_a_different_class_code_gets_a_matching_enhanced_code(stage):
    driver, last = run_to_decision(stage, Verdict(Kind.DISCONNECT, code=554, text="Blocked"))
    assert last == b"554 5.0.0 Blocked\r\n"
    assert driver.closed


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("verdict, expected", [
    (Verdict(Kind.DISCONNECT), b"421 4.7.0 Closing connection\r\n"),
    (Verdict.disconnect("Too busy", 421, "4.3.2"), b"421 4.3.2 Too busy\r\n"),
])
def test_disconnect_at_each_decision_replies_and_closes(stage, verdict, expected):
    driver, last = run_to_decision(stage, verdict)
    assert last == expected
    assert driver.closed and driver.last_sentinel is E.CLOSED
    assert driver.feed(b"NOOP\r\n") == b""
    if stage == "message":
        assert isinstance(driver.events[-1], E.MessageAborted)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("verdict", [Verdict.dunno(), Verdict.accept()])
def test_dunno_and_accept_let_the_command_through(stage, verdict):
    driver, last = run_to_decision(stage, verdict)
    assert last == (EHLO_REPLY if stage == "hello" else ACCEPTED[stage])


def test_accept_text_is_used_in_the_reply():
    driver = Driver(policy={E.MailFrom: Verdict.accept("Sender ok"), E.RcptTo: Verdict.accept("Rcpt ok"),
                            E.MessageEnd: Verdict.accept("Ok: queued as 1A2B")})
    out = driver.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")
    assert out == (EHLO_REPLY + b"250 2.1.0 Sender ok\r\n250 2.1.5 Rcpt ok\r\n" + GO_AHEAD
                   + b"250 2.0.0 Ok: queued as 1A2B\r\n")


def test_what_follows_each_refusal():
    # hello refused: still not greeted
    driver = Driver(policy={E.Hello: Verdict.reject()})
    assert session(driver, b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n") == [
        b"550 5.7.1 Rejected\r\n", NEED_HELO]
    # sender refused: no transaction
    driver = greeted(policy={E.MailFrom: [Verdict.reject()]})
    assert session(driver, b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n",
                   b"MAIL FROM:<a@b.test>\r\n") == [b"550 5.7.1 Rejected\r\n", NEED_MAIL, MAIL_OK]
    # recipient refused: no recipient, DATA has nothing to deliver to
    driver = greeted(policy={E.RcptTo: Verdict.defer()})
    assert session(driver, b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n") == [
        MAIL_OK, b"451 4.7.1 Try again later\r\n", NO_RCPT]
    # message refused: transaction over, the message discarded, a new one may start
    driver = in_transaction(policy={E.MessageEnd: [Verdict.reject()]})
    assert session(driver, b"DATA\r\nx\r\n.\r\n", b"DATA\r\n", b"MAIL FROM:<a@b.test>\r\n") == [
        GO_AHEAD + b"550 5.7.1 Rejected\r\n", NEED_MAIL, MAIL_OK]
    assert driver.events[-2] == E.MessageAborted("rejected")


def test_refused_ehlo_after_a_greeting_leaves_the_session_greeted():
    # RFC 5321 4.1.4: a refused EHLO leaves the server in the state it was in
    driver = in_transaction(policy={E.Hello: [None, Verdict.reject()]})
    assert session(driver, b"EHLO other.test\r\n", b"MAIL FROM:<a@b.test>\r\n") == [
        b"550 5.7.1 Rejected\r\n", MAIL_OK]
    assert driver.conn.helo == "client.test"


def test_verdict_text_with_line_breaks_cannot_inject_a_reply():
    driver = greeted(policy={E.MailFrom: Verdict.reject("no\r\n250 2.1.0 Ok"),
                             E.RcptTo: Verdict.defer("a\rb\x00c\x7f")})
    out = driver.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert out == b"550-5.7.1 no\r\n550 5.7.1 250 2.1.0 Ok\r\n"
    assert reply_codes(out) == [550]
    driver = greeted(policy={E.RcptTo: Verdict.defer("a\rb\x00c\x7f")})
    assert driver.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n") == (
        MAIL_OK + b"451 4.7.1 a b c\r\n")


def test_enhanced_code_from_a_plugin_cannot_inject_a_reply():
    driver = greeted(policy={E.MailFrom: Verdict.reject("Denied", 550, "5.7.1\r\n250 2.0.0")})
    out = driver.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert reply_codes(out) == [550]
    assert out.count(b"\r\n") == 1


# ----------------------------------------------------- line discipline
def test_command_line_of_512_octets_is_accepted_and_513_refused():
    driver = greeted()
    exact = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(exact) == 512
    assert session(driver, exact, b"NOOP x" + exact[5:], b"NOOP\r\n") == [OK, LINE_TOO_LONG, OK]


def test_mail_and_rcpt_lines_have_the_extended_limits():
    driver = greeted()
    mail = b"MAIL FROM:<a@b.test> AUTH="
    mail += b"u" * (MAX_MAIL_LINE - len(mail) - 2) + b"\r\n"
    rcpt = b"RCPT TO:<c@d.test> ORCPT=rfc822;"
    rcpt += b"u" * (MAX_RCPT_LINE - len(rcpt) - 2) + b"\r\n"
    assert (len(mail), len(rcpt)) == (1178, 1012)
    assert session(driver, mail[:-2] + b"u\r\n", mail, rcpt[:-2] + b"u\r\n", rcpt) == [
        LINE_TOO_LONG, MAIL_OK, LINE_TOO_LONG, RCPT_OK]
    assert session(driver, b"RSET " + b"x" * 600 + b"\r\n", b"NOOP\r\n") == [LINE_TOO_LONG, OK]


def test_a_100k_line_without_crlf_keeps_memory_bounded_and_sync():
    driver = greeted()
    largest = 0
    for _ in range(100):
        assert driver.feed(b"A" * 1024) == b""
        largest = max(largest, len(driver.conn._in))
    assert largest < 4096
    assert driver.feed(b"\r\nNOOP\r\n") == LINE_TOO_LONG + OK
    # the same line in one piece gives the same answer
    assert greeted().feed(b"A" * 102400 + b"\r\nNOOP\r\n") == LINE_TOO_LONG + OK


def test_a_long_line_ending_in_a_bare_lf_is_still_one_error():
    driver = greeted()
    assert driver.feed(b"N" * 5000 + b"\nNOOP\r\n") == LINE_TOO_LONG + OK
    driver = greeted()
    for piece in (b"N" * 2000, b"\r", b"N" * 2000 + b"\r", b"\n", b"NOOP\r\n"):
        driver.feed(piece)
    assert bytes(driver.replies).endswith(EHLO_REPLY + LINE_TOO_LONG + OK)


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"MAIL FROM:<a@b.test>\n",
                                  b"NOOP\rNOOP\n"])
def test_bare_cr_or_lf_in_a_command_is_500_and_sync_is_kept_in_reject_mode(line):
    driver = greeted(ProtocolLimits(bare_newlines="reject"))
    assert driver.feed(line + b"NOOP\r\n") == BARE_NEWLINE + OK
    assert not driver.of(E.MailFrom)


@pytest.mark.parametrize("line", [b"NO\rOP\r\n", b"NOOP\r\r\n", b"NOOP\rNOOP\n", b"NO\rOP\n"])
def test_a_bare_cr_in_a_command_is_500_in_normalize_mode_too(line):
    driver = greeted(ProtocolLimits(bare_newlines="normalize"))
    assert driver.feed(line + b"NOOP\r\n") == BARE_NEWLINE + OK


def test_commands_ending_in_a_bare_lf_are_accepted_in_normalize_mode():
    # what a script piping LF-only lines sends; only CRLF . CRLF ends the data
    driver = greeted(ProtocolLimits(bare_newlines="normalize"))
    out = driver.feed(b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\nDATA\n"
                      b"Subject: x\n\n..body\n.\nNOOP\r\n.\r\nNOOP\n")
    assert out == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                   + OK + OK)
    assert driver.of(E.MailFrom) == [E.MailFrom("a@b.test", {})]
    assert driver.messages() == [("end", b"Subject: x\r\n\r\n.body\r\nNOOP\r\n")]


@pytest.mark.parametrize("line", [b"NOOP \xff\r\n", b"NO\x00OP\r\n", b"MAIL FROM:<a\x01@b.test>\r\n",
                                  b"\x1b[31mNOOP\r\n"])
def test_invalid_bytes_in_a_command_are_500(line):
    driver = greeted()
    assert driver.feed(line + b"NOOP\r\n") == b"500 5.5.2 Error: invalid characters in command\r\n" + OK


# ------------------------------------------------- timeouts and closing
def test_timeout_gives_421_and_closes():
    driver = greeted()
    driver.conn.timeout()
    assert driver.conn.data_to_send() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert driver.conn.next_event() is E.CLOSED


def test_timeout_during_data_aborts_the_message():
    driver = in_transaction()
    driver.feed(b"DATA\r\npartial\r\n")
    assert driver.conn.in_data
    driver.conn.timeout()
    driver.pump()
    assert bytes(driver.replies).endswith(b"421 4.4.2 mx.test Error: timeout exceeded\r\n")
    assert driver.events[-1] == E.MessageAborted("mx.test Error: timeout exceeded")
    assert driver.closed


def test_shutdown_gives_421_and_closes():
    driver = greeted()
    driver.conn.shutdown()
    driver.pump()
    assert bytes(driver.replies).endswith(EHLO_REPLY + b"421 4.3.2 mx.test Service shutting down\r\n")
    assert driver.closed and driver.last_sentinel is E.CLOSED


def test_timeout_while_a_decision_is_pending_closes_without_the_answer():
    driver = Driver(auto=False)
    driver.feed(b"EHLO client.test\r\n")
    driver.conn.timeout()
    assert not driver.conn.awaiting_answer
    assert driver.conn.data_to_send() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"


def test_client_closing_mid_message_aborts_it_without_a_reply():
    driver = in_transaction()
    driver.feed(b"DATA\r\nhalf a mess")
    driver.conn.receive_data(b"")
    assert driver.pump() is E.CLOSED
    assert isinstance(driver.events[-1], E.MessageAborted)
    assert bytes(driver.replies).endswith(GO_AHEAD)


def test_client_closing_after_a_complete_command_still_gets_it_run():
    driver = greeted()
    driver.conn.receive_data(b"NOOP\r\n")
    driver.conn.receive_data(b"")
    assert driver.pump() is E.CLOSED
    assert bytes(driver.replies).endswith(OK)


def test_connection_lost_aborts_an_open_message():
    driver = in_transaction()
    driver.feed(b"BDAT 2\r\nab")
    driver.conn.connection_lost()
    driver.pump()
    assert driver.events[-1] == E.MessageAborted("connection lost")
    assert driver.closed
