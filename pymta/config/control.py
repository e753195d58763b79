"""The [control] table: where the control socket of ``pymta queue`` is.

::

    [control]
    socket = "/run/pymta/control.sock"   # default: control.sock in the spool directory

A UNIX socket's path has a length limit (``sun_path``: 107 bytes on
Linux); a longer one is a configuration error naming the key, since the
server could not listen on it.  The admin CLI reads only this and the
spool directory from the file (:func:`control_socket_of_file`), without
building the whole configuration: it need not be able to read the files
the plugins name.
"""

from __future__ import annotations

import os
from typing import Any

from pymta.config.errors import ConfigError, OptionError
from pymta.config.options import Options, PluginContext

#: the control socket's file name in the spool directory, by default
DEFAULT_SOCKET_NAME = "control.sock"
#: the longest path a UNIX socket can be bound to (sun_path less its NUL, Linux)
MAX_SOCKET_PATH = 107


def read_control(builder: Any, table: dict[str, Any], spool_dir: str) -> str:
    """[control]: the control socket's absolute path."""
    with builder.section("control"):
        opts = Options(table)
        path = opts.path("socket", builder.context, default=None)
        opts.finish()
        given = path is not None
        if path is None:
            path = os.path.join(spool_dir, DEFAULT_SOCKET_NAME)
        length = len(os.fsencode(path))
        if length > MAX_SOCKET_PATH:
            where = "" if given else f" (the default, in the spool directory {spool_dir})"
            raise OptionError("socket", f"{path}{where} is {length} bytes long; a UNIX socket "
                              f"path may have at most {MAX_SOCKET_PATH}: set [control] socket "
                              "to a shorter path")
    return path


class _PathsOnly:
    """The part of the config builder that read_control and the spool path need."""

    def __init__(self, source: str, config_dir: str) -> None:
        self.source = source
        self.context = PluginContext("", (), config_dir)

    def section(self, prefix: str):
        from pymta.config.loader import _ConfigBuilder
        return _ConfigBuilder.section(self, prefix)   # the same OptionError -> ConfigError


def control_socket_of_file(path: str | None) -> tuple[str, str]:
    """(control socket, spool directory) of the config file ``path`` (None: the embedded default).

    Reads only ``[control]`` and ``[spool] directory``; raises ConfigError.
    """
    from pymta.config.loader import DEFAULT_SPOOL_DIR, EMBEDDED_SOURCE, _read_toml
    if path is None:
        raw, source, config_dir = {}, EMBEDDED_SOURCE, os.getcwd()
    else:
        raw, source = _read_toml(path), path
        config_dir = os.path.dirname(os.path.abspath(path))
    builder = _PathsOnly(source, config_dir)
    with builder.section(""):
        top = Options(raw)
        spool = top.table("spool", {})
        control = top.table("control", {})
    with builder.section("spool"):
        spool_dir = Options(spool).path("directory", builder.context, default=DEFAULT_SPOOL_DIR)
    return read_control(builder, control, spool_dir), spool_dir


__all__ = ["read_control", "control_socket_of_file", "DEFAULT_SOCKET_NAME", "MAX_SOCKET_PATH",
           "ConfigError"]
