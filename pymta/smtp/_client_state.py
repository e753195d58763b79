"""Every transition of the SMTP client in one table (as h11's _state.py).

The client is driven from two sides:

* the caller's **actions** (``ClientConnection.start_tls()``,
  ``start_transaction()``, ``send_body()`` ...) — ``ACTIONS`` says in which
  states each one is allowed; anything else is a programming error
  (:class:`pymta.smtp.client.ClientError`);
* the server's **replies** — each command the client sends puts an
  :class:`Expect` on a FIFO queue (RFC 2920: replies come in command order);
  a complete reply is handed to the handler ``REPLY_HANDLERS[expect]``, which
  names the next state.  While a reply is awaited, ``TIMEOUTS[expect]`` names
  the :class:`pymta.smtp.client.ClientTimeouts` field that applies
  (RFC 5321 4.5.3.2).

The machine assigns its state in one place (``ClientConnection._go``):
actions and handlers name an outcome and ``ON_OUTCOME[outcome][state]`` is
the next state; an outcome in a state not listed is a bug in the machine
(KeyError), never the server's doing.  ``NEXT_STATE`` lists where each reply
handler may lead, so the table can be read (and is tested) without reading
the handlers.  Any reply may also end the session (CLOSED): a 421, or a 3xx
where no command continues.

The same table serves LMTP (RFC 2033): LHLO instead of EHLO (no HELO to
fall back to), and after the end of the content one DOT (or BDAT) reply is
awaited per accepted recipient instead of one for the transaction.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    # members are singletons: hash by identity (C speed) rather than Enum's hash of the name
    __hash__ = object.__hash__

    GREETING = "greeting"            # connected, waiting for the 220 banner
    HELLO = "hello"                  # EHLO, HELO or LHLO sent
    READY = "ready"                  # session established, no transaction, nothing outstanding
    STARTTLS = "starttls"            # STARTTLS sent
    TLS_HANDSHAKE = "tls_handshake"  # 220 to STARTTLS: the caller switches the transport to TLS
    AUTH = "auth"                    # AUTH exchange under way
    TRANSACTION = "transaction"      # MAIL/RCPT/DATA replies outstanding, no content being sent
    BODY = "body"                    # the caller is sending the message content
    FINISHING = "finishing"          # end of content sent; waiting for the final reply
    QUIT = "quit"                    # QUIT sent
    CLOSED = "closed"


class Expect(enum.Enum):
    """The reply a sent command waits for."""
    __hash__ = object.__hash__

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    LHLO = "LHLO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    RSET = "RSET"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "end of DATA"
    BDAT = "BDAT"
    QUIT = "QUIT"


#: caller action -> states in which it is allowed
ACTIONS: dict[str, frozenset[State]] = {
    "start_tls": frozenset({State.READY}),
    "tls_started": frozenset({State.TLS_HANDSHAKE}),
    "authenticate": frozenset({State.READY}),
    "start_transaction": frozenset({State.READY}),
    "send_body": frozenset({State.BODY}),
    "end_body": frozenset({State.BODY}),
    "quit": frozenset(State) - {State.CLOSED},
}

#: expected reply -> handler method of ClientConnection (``_on_<name>``)
REPLY_HANDLERS: dict[Expect, str] = {
    Expect.GREETING: "greeting",
    Expect.EHLO: "ehlo",
    Expect.HELO: "helo",
    Expect.LHLO: "lhlo",
    Expect.STARTTLS: "starttls",
    Expect.AUTH: "auth",
    Expect.RSET: "transaction_reply",
    Expect.MAIL: "transaction_reply",
    Expect.RCPT: "transaction_reply",
    Expect.DATA: "data",
    Expect.DOT: "final",
    Expect.BDAT: "final",
    Expect.QUIT: "quit",
}

#: where each reply handler may lead (documentation, checked by the tests)
NEXT_STATE: dict[str, frozenset[State]] = {
    # 2xx: EHLO; otherwise the session failed (QUIT sent)
    "greeting": frozenset({State.HELLO, State.CLOSED}),
    # 2xx: ready; 5xx: HELO instead; otherwise failed
    "ehlo": frozenset({State.READY, State.HELLO, State.CLOSED}),
    "helo": frozenset({State.READY, State.CLOSED}),
    # LMTP: 2xx: ready; otherwise failed (there is no HELO in LMTP)
    "lhlo": frozenset({State.READY, State.CLOSED}),
    # 220: the caller starts TLS; otherwise back to READY (the caller decides)
    "starttls": frozenset({State.TLS_HANDSHAKE, State.READY}),
    # 334: next step; 235 or failure: READY
    "auth": frozenset({State.AUTH, State.READY}),
    # non-pipelined: the next command goes out; the transaction may end early;
    # with the content pipelined behind RCPT (small BDAT) these replies arrive
    # while it is being sent or after it (BODY, FINISHING unchanged)
    "transaction_reply": frozenset({State.TRANSACTION, State.BODY, State.FINISHING, State.READY}),
    # 354: content; otherwise the transaction ends
    "data": frozenset({State.BODY, State.FINISHING, State.READY}),
    # READY; a server answering BDAT before all of its octets were sent leaves BODY;
    # LMTP: FINISHING until the reply of the last accepted recipient
    "final": frozenset({State.READY, State.BODY, State.FINISHING}),
    "quit": frozenset({State.CLOSED}),
}

#: outcome -> {state it may happen in: next state}
ON_OUTCOME: dict[str, dict[State, State]] = {
    # EHLO or LHLO (after the greeting or TLS) or HELO (EHLO refused with 5xx) sent
    "hello": {State.GREETING: State.HELLO, State.HELLO: State.HELLO,
              State.TLS_HANDSHAKE: State.HELLO},
    "ready": {State.HELLO: State.READY},
    "starttls": {State.READY: State.STARTTLS},
    "tls_granted": {State.STARTTLS: State.TLS_HANDSHAKE},
    "tls_refused": {State.STARTTLS: State.READY},
    "auth": {State.READY: State.AUTH},
    "auth_done": {State.AUTH: State.READY},
    "transaction": {State.READY: State.TRANSACTION},
    # 354 to DATA, or BDAT sent: the caller sends the content
    "body": {State.TRANSACTION: State.BODY},
    # end of content sent (or "." at once after a 354 with no recipient accepted)
    "body_end": {State.BODY: State.FINISHING, State.TRANSACTION: State.FINISHING},
    # TransactionDone: every reply in, or the session lost (CLOSED follows)
    "transaction_done": {State.TRANSACTION: State.READY, State.BODY: State.READY,
                         State.FINISHING: State.READY},
    "quit": {State.READY: State.QUIT},
    "closed": {s: State.CLOSED for s in State},
}

#: expected reply -> ClientTimeouts field (RFC 5321 4.5.3.2 defaults there)
TIMEOUTS: dict[Expect, str] = {
    Expect.GREETING: "greeting",
    Expect.EHLO: "helo",
    Expect.HELO: "helo",
    Expect.LHLO: "helo",
    Expect.STARTTLS: "starttls",
    Expect.AUTH: "auth",
    Expect.RSET: "rset",
    Expect.MAIL: "mail",
    Expect.RCPT: "rcpt",
    Expect.DATA: "data_init",
    Expect.DOT: "data_done",
    Expect.BDAT: "data_done",
    Expect.QUIT: "quit",
}
