"""Queue ids: unique, sortable by time, safe as file names.

In the style of Postfix long queue ids: the time of allocation, then a
per-process counter, then random bits.  Encoded with the Crockford base32
alphabet, whose ASCII order is its numeric order, so sorting ids as strings
sorts them by allocation time.

Layout (16 characters)::

    TTTTTTTTTTT CC RRR
    |           |  +-- 15 random bits (separates processes allocating in the same microsecond)
    |           +----- 10-bit per-process counter
    +----------------- microseconds since the epoch (55 bits: good until the year 3111)

The spool still creates every id's file with ``O_EXCL`` and retries on a
collision, so uniqueness never rests on chance alone.
"""

from __future__ import annotations

import re
import os
import random
import secrets
import threading
import time
import weakref

#: Crockford base32 (no I, L, O, U): uppercase alphanumerics, ASCII order = value order
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

TIME_CHARS = 11
COUNTER_CHARS = 2
RANDOM_CHARS = 3
LENGTH = TIME_CHARS + COUNTER_CHARS + RANDOM_CHARS

QUEUE_ID_RE = re.compile(f"^[{ALPHABET}]{{{LENGTH}}}$")


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    if value:
        raise OverflowError(f"value does not fit in {width} base32 digits")
    return "".join(reversed(chars))


def is_queue_id(text: str) -> bool:
    """Is ``text`` shaped like a queue id (as found in spool file names)?"""
    return QUEUE_ID_RE.match(text) is not None


def queue_id_time(queue_id: str) -> float:
    """The unix time encoded in ``queue_id`` (seconds, microsecond resolution)."""
    if not is_queue_id(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    micros = 0
    for char in queue_id[:TIME_CHARS]:
        micros = micros * 32 + ALPHABET.index(char)
    return micros / 1e6


class QueueIdGenerator:
    """Allocates queue ids; ids from one generator are strictly increasing."""

    def __init__(self, clock=time.time_ns):
        self._clock = clock
        self._lock = threading.Lock()
        self._last_micros = 0
        # the random part only separates processes: a PRNG seeded from the
        # system's, not a getrandom(2) call per id (two, with rejection);
        # reseeded in a forked child, which must not repeat its parent
        self._reseed()
        reseed = weakref.WeakMethod(self._reseed)
        os.register_at_fork(after_in_child=lambda: (method := reseed()) is not None and method())

    def _reseed(self) -> None:
        self._counter = secrets.randbelow(32 ** COUNTER_CHARS)
        self._random = random.Random(secrets.randbits(128))

    def next(self) -> str:
        with self._lock:
            micros = self._clock() // 1000
            # never go backwards (clock steps): reuse the last microsecond;
            # the counter then keeps ids of this process in order.
            if micros < self._last_micros:
                micros = self._last_micros
            self._counter = (self._counter + 1) % (32 ** COUNTER_CHARS)
            if micros == self._last_micros and self._counter == 0:
                # 1024 ids in one microsecond: move on rather than wrap
                micros += 1
            self._last_micros = micros
            counter = self._counter
            noise = self._random.getrandbits(5 * RANDOM_CHARS)
        return (_encode(micros, TIME_CHARS)
                + _encode(counter, COUNTER_CHARS)
                + _encode(noise, RANDOM_CHARS))


_default = QueueIdGenerator()


def new_queue_id() -> str:
    """A fresh queue id from the process-wide generator."""
    return _default.next()
