"""What a delivery command's exit status means: the sysexits.h table.

The same table as Postfix's ``sys_exits.c`` (pipe(8), local(8)): each code of
``<sysexits.h>`` is a temporary (4.x.x: retried) or permanent (5.x.x:
bounced) failure with an enhanced status code and a short text.  Another
non-zero status is a permanent failure, as in Postfix ("command died with
status N").  A command killed by a signal, or by the time limit, is retried.
"""

from __future__ import annotations

from typing import NamedTuple


class ExitMeaning(NamedTuple):
    #: enhanced status code (RFC 3463); its class says retry (4) or bounce (5)
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return self.enhanced.startswith("4.")


EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

SYSEXITS: dict[int, ExitMeaning] = {
    EX_USAGE: ExitMeaning("5.3.0", "command line usage error"),
    EX_DATAERR: ExitMeaning("5.6.0", "data format error"),
    EX_NOINPUT: ExitMeaning("5.3.0", "cannot open input"),
    EX_NOUSER: ExitMeaning("5.1.1", "user unknown"),
    EX_NOHOST: ExitMeaning("5.1.2", "host name unknown"),
    EX_UNAVAILABLE: ExitMeaning("5.3.0", "service unavailable"),
    EX_SOFTWARE: ExitMeaning("5.3.0", "internal software error"),
    EX_OSERR: ExitMeaning("4.3.0", "system resource problem"),
    EX_OSFILE: ExitMeaning("5.3.0", "critical OS file missing"),
    EX_CANTCREAT: ExitMeaning("5.2.0", "can't create user output file"),
    EX_IOERR: ExitMeaning("5.3.0", "input/output error"),
    EX_TEMPFAIL: ExitMeaning("4.3.0", "temporary failure"),
    EX_PROTOCOL: ExitMeaning("5.5.0", "remote error in protocol"),
    EX_NOPERM: ExitMeaning("5.7.0", "permission denied"),
    EX_CONFIG: ExitMeaning("5.3.5", "local configuration error"),
}

#: a non-zero status that is not in the table
OTHER_STATUS = ExitMeaning("5.3.0", "unknown mail transport error")


def exit_meaning(status: int) -> ExitMeaning:
    """What a non-zero exit ``status`` means (see the module docstring)."""
    return SYSEXITS.get(status, OTHER_STATUS)
