"""The settings a reload cannot change: they wait for a restart.

The one list of them.  A reload that finds one of these changed logs
``reload: KEY changed: needs a restart`` and keeps the running value in
the configuration it puts in force, so everything else reads one
consistent configuration, and the next reload says it again while the
file and the running server differ.

- the spool (``[spool] directory``, ``sync``, ``disk_work``): the spool, its
  disk worker and the scheduler's recovered queue are made once, at start;
- the control socket and the metrics endpoint (``[control]``,
  ``[metrics]``): services bound at start; the log's format (``[log]
  format``): its observer is put in place at start;
- the user pymta runs as: twistd's ``--uid``/``--gid``, on the command
  line, not in the file; a reload never reads them.

A table added later whose change cannot be applied live gets one line
here: the :class:`pymta.config.model.Config` attribute and the name an
administrator knows it by (an attribute the Config does not have is
skipped, so an entry may come before its table).
"""

from __future__ import annotations

import dataclasses

from pymta.config.model import Config

#: Config attribute -> the config key it comes from
RESTART_ONLY: dict[str, str] = {
    "spool_dir": "spool.directory",
    "spool_sync": "spool.sync",
    "spool_disk_work": "spool.disk_work",
    "control_socket": "control.socket",
    "metrics_endpoint": "metrics.endpoint",
    "log_format": "log.format",
}


def hold_for_restart(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of the settings that need a restart, and their keys.

    The keys are those whose value in ``new`` differs from the running one.
    """
    changed: dict[str, object] = {}
    keys = []
    for attribute, key in RESTART_ONLY.items():
        if not hasattr(running, attribute) or not hasattr(new, attribute):
            continue
        value = getattr(running, attribute)
        if getattr(new, attribute) != value:
            changed[attribute] = value
            keys.append(key)
    if not changed:
        return new, []
    return dataclasses.replace(new, **changed), keys
