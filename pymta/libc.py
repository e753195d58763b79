"""The C library calls that Python's ``os`` module lacks: ``syncfs(2)`` and
``prctl(PR_SET_PDEATHSIG)``, loaded once through ctypes.

Each is Linux-only; elsewhere (or where the C library lacks it) the caller
gets None or nothing happens, and falls back to what ``os`` offers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import signal
import sys
from typing import Callable

#: prctl(2) option: signal to get when the parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


@functools.cache
def load_libc() -> ctypes.CDLL | None:
    """The C library (errno kept for ``ctypes.get_errno``), or None off Linux or when it cannot load."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def load_syncfs() -> Callable[[int], int] | None:
    """``syncfs(fd)`` (0, or -1 with ``ctypes.get_errno()`` set), or None where there is none."""
    libc = load_libc()
    try:
        function = libc.syncfs  # type: ignore[union-attr]
    except AttributeError:
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    libc = load_libc()
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # type: ignore[union-attr]
    except AttributeError:
        pass
