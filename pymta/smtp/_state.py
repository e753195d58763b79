"""Every transition of the SMTP server in one table (as h11's _state.py).

``TRANSITIONS[verb][state]`` is either the name of a handler of
:class:`pymta.smtp.server.ServerConnection` or a fixed error reply.  A verb
missing from the table is "not recognized" (500); a state missing for a
verb is a bad sequence (503).  ``ON_OUTCOME`` says where the machine moves
within a command or the content (DATA, end of data, STARTTLS, SASL steps)
and where an answered decision leads; the machine assigns its state in one
place (``ServerConnection._go``), from this table.
"""

from __future__ import annotations

import enum

from pymta.smtp import replies as R


class State(enum.Enum):
    GREETING = "greeting"      # connected, banner not yet sent
    READY = "ready"            # banner sent, no HELO/EHLO yet
    HELO = "helo"              # greeted, no mail transaction
    MAIL = "mail"              # MAIL accepted, no recipient yet
    RCPT = "rcpt"              # at least one recipient accepted
    DATA = "data"              # reading DATA content
    BDAT_CHUNK = "bdat_chunk"  # reading the octets of a BDAT chunk
    BDAT_MORE = "bdat_more"    # a non-LAST BDAT chunk was accepted
    TLS_PENDING = "tls_pending"  # 220 to STARTTLS sent; waiting for the TLS layer
    AUTH = "auth"              # a SASL challenge (334) was sent; reading the response line
    CLOSED = "closed"


COMMAND_STATES = (State.READY, State.HELO, State.MAIL, State.RCPT, State.BDAT_MORE)
# No mail transaction in flight.  A draining session (the server is stopping)
# is closed with 421 4.3.2 here: at once when the client has sent nothing
# more, or at its next command (QUIT is still answered 221).  In the other
# states the transaction in flight may finish first.
IDLE_STATES = frozenset({State.READY, State.HELO, State.AUTH})


def _all(handler: str) -> dict:
    return {s: handler for s in COMMAND_STATES}


TRANSITIONS: dict[str, dict[State, object]] = {
    "EHLO": _all("ehlo"),
    "HELO": _all("helo"),
    "MAIL": {State.READY: R.NEED_HELO, State.HELO: "mail", State.MAIL: R.NESTED_MAIL,
             State.RCPT: R.NESTED_MAIL, State.BDAT_MORE: R.NESTED_MAIL},
    "RCPT": {State.READY: R.NEED_MAIL, State.HELO: R.NEED_MAIL, State.MAIL: "rcpt",
             State.RCPT: "rcpt", State.BDAT_MORE: R.RCPT_AFTER_BDAT},
    "DATA": {State.READY: R.NEED_MAIL, State.HELO: R.NEED_MAIL, State.MAIL: R.NEED_RCPT,
             State.RCPT: "data", State.BDAT_MORE: R.DATA_AFTER_BDAT},
    # BDAT in a wrong state still has to swallow its chunk (RFC 3030 2)
    "BDAT": {State.READY: ("bdat_refuse", R.NEED_HELO),
             State.HELO: ("bdat_refuse", R.BDAT_NO_TRANSACTION),
             State.MAIL: ("bdat_refuse", R.NEED_RCPT),
             State.RCPT: "bdat", State.BDAT_MORE: "bdat"},
    "RSET": _all("rset"),
    "NOOP": _all("noop"),
    "VRFY": _all("vrfy"),
    "HELP": _all("help"),
    "QUIT": _all("quit"),
    # recognised, not offered here
    "EXPN": {s: R.NOT_IMPLEMENTED for s in COMMAND_STATES},
    "TURN": {s: R.NOT_IMPLEMENTED for s in COMMAND_STATES},
    # RFC 1985: outside a mail transaction
    "ETRN": {State.READY: R.NEED_HELO, State.HELO: "etrn", State.MAIL: R.IN_TRANSACTION,
             State.RCPT: R.IN_TRANSACTION, State.BDAT_MORE: R.IN_TRANSACTION},
    # RFC 3207 / RFC 4954: before a mail transaction only
    "STARTTLS": {State.READY: "starttls", State.HELO: "starttls", State.MAIL: R.IN_TRANSACTION,
                 State.RCPT: R.IN_TRANSACTION, State.BDAT_MORE: R.IN_TRANSACTION},
    "AUTH": {State.READY: R.NEED_HELO, State.HELO: "auth", State.MAIL: R.IN_TRANSACTION,
             State.RCPT: R.IN_TRANSACTION, State.BDAT_MORE: R.IN_TRANSACTION},
}

# Where the machine moves within a command or the content, and after an answer:
# ``ON_OUTCOME[outcome][state]`` is the next state.  Handlers name the outcome
# (``conn._go("data")``) and never assign a state themselves; an outcome in a
# state not listed here is a bug in the machine (KeyError), never a client's doing.
_NO_TRANSACTION = {State.READY: State.READY, State.HELO: State.HELO, State.MAIL: State.HELO,
                   State.RCPT: State.HELO, State.BDAT_MORE: State.HELO}
#: the refused BDAT chunk is swallowed: back to the state the BDAT came in
BACK = "back"
ON_OUTCOME: dict[str, dict[State, object]] = {
    "greeted": {State.GREETING: State.READY},
    # EHLO/HELO (before its answer), RSET, a BDAT syntax error: no transaction
    # (greeted or not, as before)
    "no_transaction": _NO_TRANSACTION,
    "data": {State.RCPT: State.DATA},
    "bdat": {s: State.BDAT_CHUNK for s in COMMAND_STATES},
    "chunk_accepted": {State.BDAT_CHUNK: State.BDAT_MORE},
    "chunk_refused": {State.BDAT_CHUNK: BACK},
    # the end of the content waits for the "message" answer in RCPT
    "message_end": {State.DATA: State.RCPT, State.BDAT_CHUNK: State.RCPT},
    # a protocol rule (size, bare newline, NUL, line length) refuses it at its
    # end, or the answer to MessageEnd does (below)
    "message_refused": {State.DATA: State.HELO, State.BDAT_CHUNK: State.HELO,
                        State.RCPT: State.HELO},
    "starttls": {State.READY: State.TLS_PENDING, State.HELO: State.TLS_PENDING},
    "tls_started": {State.TLS_PENDING: State.READY},
    # 334 sent (AUTH without initial response, or LOGIN's user name step)
    "sasl_challenge": {State.HELO: State.AUTH, State.AUTH: State.AUTH},
    # the exchange ends: credentials to decide, cancelled or malformed
    "sasl_end": {State.HELO: State.HELO, State.AUTH: State.HELO},
    "closed": {s: State.CLOSED for s in State},
    # an answered decision (ServerConnection.answer): "<kind>_accepted" or
    # "<kind>_refused" (deferred too), from the state the decision was taken
    # in; a refused HELO/EHLO, MAIL or RCPT leaves it as it was (RFC 5321 4.1.4)
    "hello_accepted": {State.READY: State.HELO, State.HELO: State.HELO},
    "hello_refused": {State.READY: State.READY, State.HELO: State.HELO},
    "mail_accepted": {State.HELO: State.MAIL},
    "mail_refused": {State.HELO: State.HELO},
    "rcpt_accepted": {State.MAIL: State.RCPT, State.RCPT: State.RCPT},
    "rcpt_refused": {State.MAIL: State.MAIL, State.RCPT: State.RCPT},
    # the end of the content waits in RCPT (message_end); "message_refused" above
    "message_accepted": {State.RCPT: State.HELO},
    "auth_accepted": {State.HELO: State.HELO},
    "auth_refused": {State.HELO: State.HELO},
    "etrn_accepted": {State.HELO: State.HELO},
    "etrn_refused": {State.HELO: State.HELO},
}

