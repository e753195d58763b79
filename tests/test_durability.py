"""kill -9 at any moment: every message answered 250 is delivered, byte for byte."""

from __future__ import annotations

import collections
import random
import smtplib
import threading
import time

from conftest import BACKEND_TOML, ROOT

PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'


def _body(token: str, size: int) -> bytes:
    filler = (f"{token} " * (size // (len(token) + 1) + 1))[:size]
    lines = [filler[i:i + 70] for i in range(0, len(filler), 70)]
    return (f"Subject: {token}\r\nMessage-ID: <{token}@example.test>\r\n\r\n" +
            "\r\n".join(lines) + "\r\n.dot line\r\n").encode()


def _blast(port: int, prefix: str, accepted: dict, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
                while not stop.is_set():
                    n += 1
                    token = f"{prefix}-{n}"
                    body = _body(token, random.choice((200, 3000, 40000)))
                    s.sendmail("load@example.org", ["durable@example.test"], body)
                    accepted[token] = body      # only after 250
        except (OSError, smtplib.SMTPException):
            time.sleep(0.01)


def _delivered_bodies(server, tokens, timeout: float = 30.0) -> dict[str, bytes]:
    """Wait until every token in ``tokens`` was delivered (duplicates may exist); token -> body."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, bytes] = {}
        for msg in server.delivered("durable@example.test", 0, timeout=0):
            body = msg[msg.index(b"\r\nSubject: ") + 2:]
            token = body.split(b"\r\n", 1)[0][len(b"Subject: "):].decode()
            found[token] = body
        if set(tokens) <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _kill9_under_load(server, rounds: int, senders: int, prefix: str,
                      load: tuple[float, float]) -> dict[str, bytes]:
    """``rounds`` times: ``senders`` threads send, kill -9 after a random time in
    ``load`` seconds, restart.  Returns what the server acknowledged (tag → body)."""
    accepted: dict[str, bytes] = {}
    for round_no in range(rounds):
        stop = threading.Event()
        threads = [threading.Thread(target=_blast, args=(server.port, f"{prefix}{round_no}t{i}", accepted, stop))
                   for i in range(senders)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(*load))
        server.kill9()
        stop.set()
        for t in threads:
            t.join(10)
        server.start()
    return accepted


def test_kill9_during_load_loses_nothing(make_server):
    server = make_server()
    accepted = _kill9_under_load(server, rounds=3, senders=4, prefix="r", load=(0.4, 1.2))
    assert len(accepted) > 20, "the load did not get going"
    found = _delivered_bodies(server, accepted)
    missing = sorted(set(accepted) - set(found))
    assert not missing, f"{len(missing)} of {len(accepted)} acknowledged messages lost: {missing[:5]}"
    for token, body in accepted.items():
        assert found[token] == body, f"{token} delivered altered"


def test_spooled_messages_survive_kill9_and_are_delivered_after_restart(make_server):
    hold = '[backends.local]\nuse = "test_policies:DeferAll"\n\n[queue]\nretry_initial = "2s"\n'
    server = make_server(hold, server_toml=PLUGIN_PATH)
    sent = {}
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        for i in range(20):
            token = f"held-{i}"
            sent[token] = _body(token, 500 * i)
            s.sendmail("load@example.org", ["durable@example.test"], sent[token])
    queued = list((server.spool / "queue").glob("*.msg"))
    assert len(queued) == 20
    server.kill9()
    # same spool, now routed to a real Maildir
    server.config.write_text(server.config.read_text().replace(hold, BACKEND_TOML))
    server.start()
    found = _delivered_bodies(server, sent)
    assert found == sent
    deadline = time.monotonic() + 10
    while list((server.spool / "queue").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((server.spool / "queue").glob("*")) == []


def _copies(server, address: str) -> collections.Counter:
    """How many times each token (Subject) is in the Maildir ``new/`` of ``address``."""
    copies: collections.Counter = collections.Counter()
    for msg in server.delivered(address, 0, timeout=0):
        subject = msg.index(b"\r\nSubject: ") + len(b"\r\nSubject: ")
        copies[msg[subject:msg.index(b"\r\n", subject)].decode()] += 1
    return copies


#: deliveries in flight at once in the duplicates test ([queue] concurrency)
DUPES_CONCURRENCY = 8
KILLS = 5


def test_kill9_under_load_repeats_at_most_the_deliveries_in_flight(make_server):
    """kill -9 at random moments under load: nothing acknowledged is lost, few are repeated.

    A message delivered into the Maildir whose spool entry was not removed
    yet is delivered again after the restart.  Each kill may repeat the
    deliveries in flight (at most ``concurrency`` backend calls), not the
    deliveries whose results were still on their way to the spool.
    """
    server = make_server(BACKEND_TOML + f"\n[queue]\nconcurrency = {DUPES_CONCURRENCY}\n")
    # bounded: each round is at most 1.5 s of load, 10 s of joins and a start-up
    accepted = _kill9_under_load(server, rounds=KILLS, senders=6, prefix="d", load=(0.5, 1.5))
    assert len(accepted) > 50, "the load did not get going"
    found = _delivered_bodies(server, accepted, timeout=60)
    missing = sorted(set(accepted) - set(found))
    assert not missing, f"{len(missing)} of {len(accepted)} acknowledged messages lost: {missing[:5]}"
    # everything in the spool delivered: no more copies can come
    quiet = time.monotonic() + 30
    while list((server.spool / "queue").glob("*.msg")) and time.monotonic() < quiet:
        time.sleep(0.05)
    copies = _copies(server, "durable@example.test")
    duplicates = sum(n - 1 for n in copies.values())
    print(f"\nkill -9 duplicates: {duplicates} in {KILLS} kills = {duplicates / KILLS:.1f} per kill "
          f"({len(accepted)} messages acknowledged, {sum(copies.values())} delivered)")
    assert duplicates <= DUPES_CONCURRENCY * KILLS, \
        f"{duplicates} duplicates after {KILLS} kills: more than the deliveries in flight"
