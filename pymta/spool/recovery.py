"""Start-up after a crash: :func:`recover` the committed messages, :func:`quarantine` the unreadable.

Runs on the calling thread before anything else uses the spool (the
reactor side calls it through :meth:`pymta.spool.store.Spool.recover`).
The format of the files is :mod:`pymta.spool.queuefile`.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

from pymta.envelope import Envelope
from pymta.filesync import fsync_directory as _fsync_directory
from pymta.spool.queuefile import (BODY_SUFFIX, CORRUPT_DIR, ENVELOPE_SUFFIX, QUEUE_DIR, TMP_DIR,
                                   load_queue_file, queue_ids)
from pymta.spool.queueid import is_queue_id

# the namespace the spool's log lines had before the file side had its own module
log = Logger(namespace="pymta.spool.store")


def recover(directory: str) -> list[Envelope]:
    """Clean up after a crash and return every committed envelope, oldest first.

    Runs at start-up, before anything else uses the spool, on the calling
    thread.  Temp files are uncommitted and deleted; an updated envelope
    in ``queue/`` without its message file is what a crash left of a
    removal, and deleted too.  A committed message whose envelope cannot
    be read or whose body is not the size its envelope says is logged
    and moved (with its updated envelope) to ``corrupt/``.
    """
    tmp_dir = os.path.join(directory, TMP_DIR)
    queue_dir = os.path.join(directory, QUEUE_DIR)
    committed = set(queue_ids(queue_dir))
    for name in os.listdir(tmp_dir):
        path = os.path.join(tmp_dir, name)
        try:
            os.unlink(path)
        except IsADirectoryError:
            log.warn("spool: ignoring unexpected directory {path}", path=path)
        except FileNotFoundError:
            pass
        else:
            log.info("spool: removed uncommitted temp file {path}", path=path)
    for name in os.listdir(queue_dir):
        stem, _, suffix = name.rpartition(".")
        if "." + suffix == ENVELOPE_SUFFIX and is_queue_id(stem) and stem not in committed:
            os.unlink(os.path.join(queue_dir, name))
            log.info("{queue_id}: removed the envelope of a removed message", queue_id=stem)
        elif not (is_queue_id(stem) and "." + suffix in (BODY_SUFFIX, ENVELOPE_SUFFIX)):
            log.warn("spool: ignoring unexpected file {path}",
                     path=os.path.join(queue_dir, name))
    envelopes = []
    for queue_id in sorted(committed):
        problem = _check_committed(queue_dir, queue_id)
        if isinstance(problem, Envelope):
            envelopes.append(problem)
        else:
            quarantine(directory, queue_id, problem)
    _fsync_directory(queue_dir)
    return envelopes


def _check_committed(queue_dir: str, queue_id: str) -> Envelope | str:
    path = os.path.join(queue_dir, queue_id + BODY_SUFFIX)
    try:
        envelope, size = load_queue_file(queue_dir, queue_id)
    except OSError as e:
        return f"{e.filename or path}: {e.strerror}"
    except (ValueError, TypeError, KeyError) as e:
        return f"unreadable envelope in {path}: {e}"
    if size != envelope.size:
        return f"{path} holds a body of {size} bytes, the envelope says {envelope.size}"
    return envelope


def quarantine(directory: str, queue_id: str, problem: str) -> None:
    """Move a committed message that cannot be loaded (and its updated envelope) to ``corrupt/``."""
    queue_dir = os.path.join(directory, QUEUE_DIR)
    corrupt_dir = os.path.join(directory, CORRUPT_DIR)
    log.error("{queue_id}: corrupt spool entry, moved to {corrupt}: {problem}",
              queue_id=queue_id, corrupt=corrupt_dir, problem=problem)
    for suffix in (BODY_SUFFIX, ENVELOPE_SUFFIX):
        path = os.path.join(queue_dir, queue_id + suffix)
        if not os.path.exists(path):
            continue
        target = os.path.join(corrupt_dir, os.path.basename(path))
        n = 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(corrupt_dir, f"{os.path.basename(path)}.{n}")
        try:
            os.rename(path, target)
        except OSError as e:
            log.error("{queue_id}: cannot move {path} to {target}: {error}",
                      queue_id=queue_id, path=path, target=target, error=e.strerror)
