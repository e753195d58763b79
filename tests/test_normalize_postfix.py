"""``bare_newlines = "normalize"`` stores what Postfix's ``smtpd_forbid_bare_newline =
normalize`` stores: the same bytes sent to a real Postfix and to pymta give the same
message content (Postfix's Maildir files have LF line ends, pymta's CRLF).

Postfix 3.9 made normalize its default; the Debian Postfix 3.7 backports it.
"""

from __future__ import annotations

import pytest

from conftest import free_port
from postfix import PostfixInstance, require_postfix
from smtpwire import Wire

# message content after the header; sequences of bare LFs and dots (bare CRs
# and NULs are left out: Postfix's local delivery rewrites them)
CASES = {
    "lf-dotdot": b"A\n..\nB\r\n",
    "crlf-dotdot-lf": b"A\r\n..\nB\r\n",
    "lf-dotdot-crlf": b"A\n..\r\nB\r\n",
    "lf-dot-lf": b"A\n.\nB\r\n",
    "lf-dot-crlf": b"A\n.\r\nB\r\n",
    "crlf-dot-lf": b"A\r\n.\nB\r\n",
    "lf-dots": b"A\n.\n.\n.\nB\r\n",
    "lf-leading-dot": b"A\n.x\n..y\nB\r\n",
    "first-line": b".\n..\nB\r\n",
    "smuggle": b"A\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n",
}


class NormalizingPostfix(PostfixInstance):
    def configure(self, **kw):
        kw["settings"] = (kw.get("settings", "") + "smtpd_forbid_bare_newline = normalize\n"
                          "smtpd_forbid_bare_newline_exclusions =\n")
        super().configure(**kw)


def send(port: int, recipient: str, content: bytes) -> None:
    w = Wire(port)
    w.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<" + recipient.encode()
           + b">\r\nDATA\r\n")
    assert [w.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    w.send(b"Subject: " + recipient.encode() + b"\r\n\r\n" + content + b".\r\n")
    assert w.reply()[0] == 250
    w.cmd("QUIT")


def body_of(message: bytes, recipient: str) -> bytes:
    """The message body (after the header, which each server adds its own fields to),
    line ends as LF."""
    message = message.replace(b"\r\n", b"\n")
    assert b"Subject: " + recipient.encode() + b"\n" in message
    return message.split(b"\n\n", 1)[1]


@pytest.fixture(scope="module")
def postfix():
    require_postfix()
    instance = NormalizingPostfix(free_port(), ("postfix.test",))
    try:
        yield instance.start()
    finally:
        instance.stop()


def test_postfix_and_pymta_store_the_same_content(postfix, server):
    for name, content in CASES.items():
        send(postfix.port, f"{name}@postfix.test", content)
        send(server.port, f"{name}@example.test", content)
    for name, content in CASES.items():
        [theirs] = postfix.delivered(f"{name}@postfix.test")
        [ours] = server.delivered(f"{name}@example.test")
        assert b"\n" not in ours.replace(b"\r\n", b"")        # CRLF only
        assert body_of(ours, f"{name}@example.test") == body_of(theirs, f"{name}@postfix.test"), name
