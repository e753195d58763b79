"""File modes pymta insists on.

A file that holds a secret (the AUTH password file's hashes, the smarthost
password) must not be readable by other users: the server refuses one that
is, and ``pymta passwd`` warns about it.
"""

from __future__ import annotations

import stat


def is_world_readable(mode: int) -> bool:
    """Whether ``mode`` (an ``st_mode``) lets every user read the file."""
    return bool(mode & stat.S_IROTH)
