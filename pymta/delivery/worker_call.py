"""What a local delivery backend runs in the disk worker's child (:mod:`pymta.worker.process`).

The server sends :func:`deliver_local` with a backend's description
(:meth:`pymta.delivery.mailbox.LocalMailboxBackend.worker_spec`): the child
builds the same backend class from its options once, and runs each batch
of deliveries there, recording them in the spool in the same call.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from pymta.config.options import PluginContext

_backends: dict[str, Any] = {}
#: calls run in several threads of the child: one backend per spec
_made = threading.Lock()


def deliver_local(spec: tuple, jobs: list[tuple[Any, list]]) -> tuple[list[list], list[bool]]:
    """``backend.deliver_and_record(jobs)`` for the local backend described by ``spec`` in the child.

    ``spec``: (module, class name, options, hostname, domains, config dir),
    see :meth:`pymta.delivery.mailbox.LocalMailboxBackend.worker_spec`.
    Returns the results of each job, and whether each job's message left the
    spool in this same call (see :class:`pymta.spool.worker_calls.DeliveryRecord`).
    """
    key = repr(spec)
    with _made:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = _make_backend(spec)
    return backend.deliver_and_record(jobs)


def _make_backend(spec: tuple) -> Any:
    module, name, options, hostname, domains, config_dir = spec
    cls = getattr(importlib.import_module(module), name)
    context = PluginContext(hostname=hostname, domains=domains, config_dir=config_dir)
    return cls(dict(options), context)
