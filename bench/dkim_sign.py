"""DKIM signing of large messages: dkimpy on the whole message vs pymta's streamed body hash.

Not part of the test suite.  For each message size it signs once with
dkimpy's own ``dkim.sign`` (the message in memory) and once with
``pymta.dkim.signer.sign_message`` (header section to dkimpy, body streamed
in 64 KiB pieces), each in a thread, while the main thread stands for the
reactor: it wakes every millisecond and records the longest time it could
not run (the GIL held by the signing thread).  Prints seconds per signature,
MB/s and that longest stall, and the ratios between the two::

    .venv/bin/python bench/dkim_sign.py                  # 0.1, 1, 20 MiB, RSA 2048
    .venv/bin/python bench/dkim_sign.py --sizes 50 --ed25519
"""

from __future__ import annotations

import argparse
import io
import threading
import time

import dkim

from pymta.dkim.keys import generate_key, parse_private_key
from pymta.dkim.signer import SignOptions, SigningKey, sign_message

LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit  \t sed do eiusmod tempor\r\n"


def message(mib: float) -> bytes:
    body = LINE * max(1, int(mib * 1024 * 1024) // len(LINE))
    return (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: bench\r\n"
            b"Message-ID: <1@example.org>\r\n\r\n" + body)


def measure(sign) -> tuple[float, float]:
    """(seconds the signing took, longest stall of the main thread) with ``sign`` in a thread."""
    done = threading.Event()
    took = []

    def work():
        start = time.perf_counter()
        sign()
        took.append(time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=work)
    longest = 0.0
    last = time.perf_counter()
    thread.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last - 0.001)
        last = now
    thread.join()
    return took[0], longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,20", help="message sizes in MiB, comma separated")
    parser.add_argument("--ed25519", action="store_true", help="an Ed25519 key instead of RSA 2048")
    args = parser.parse_args()
    pem = generate_key(ed25519_key=args.ed25519)
    key = parse_private_key(pem)
    keys = [SigningKey("example.org", "bench", key, "")]
    algorithm = key.algorithm.encode()
    print(f"{'MiB':>6} {'signer':<16} {'seconds':>8} {'MB/s':>8} {'longest stall':>14}")
    for size in (float(s) for s in args.sizes.split(",")):
        msg = message(size)
        rows = {}
        rows["dkimpy"] = measure(lambda: dkim.sign(
            msg, b"bench", b"example.org", key.dkimpy_key, signature_algorithm=algorithm,
            canonicalize=(b"relaxed", b"relaxed")))
        rows["pymta streamed"] = measure(lambda: sign_message(io.BytesIO(msg), keys, SignOptions()))
        for name, (seconds, stall) in rows.items():
            print(f"{size:>6g} {name:<16} {seconds:>8.3f} {len(msg) / seconds / 1e6:>8.1f} "
                  f"{stall * 1000:>11.1f} ms")
        (a, sa), (b, sb) = rows["dkimpy"], rows["pymta streamed"]
        print(f"{size:>6g} {'ratio':<16} {a / b:>7.1f}x {'':>8} {sa / max(sb, 1e-4):>10.0f}x shorter")


if __name__ == "__main__":
    main()
