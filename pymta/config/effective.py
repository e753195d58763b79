"""The effective configuration: what a load read, with the defaults filled in.

:func:`load_recorded` loads a config file exactly as start-up does
(:func:`pymta.config.loader.load_config`) while a
:class:`pymta.config.options.ReadRecorder` notes every key each table and
each plugin asked for, its value and its default.  :func:`effective_document`
turns that into a TOML document (see :mod:`pymta.config.toml_text`):

* every key with its value: as given (durations as ``"5m"``, paths made
  absolute), or the default the loader or the plugin used;
* with ``changed_only``, only the keys given in the file whose value differs
  from their default (like ``postconf -n``), and a plugin's ``use`` when the
  file gives it;
* secrets (``password``, ``secret``, ``token``, ``passphrase`` keys) are
  written as a comment without their value, and a password in a URL
  (``redis://:PASSWORD@host``) as ``********``; a key without a value
  (unset, no default) is a comment too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from pymta.config.durations import format_duration
from pymta.config.loader import load_config
from pymta.config.model import Config
from pymta.config.options import REQUIRED, OptionRead, ReadRecorder, recording_reads
from pymta.config.toml_text import Comment

__all__ = ["load_recorded", "effective_document", "TOP_LEVEL_ORDER"]

#: the order of the top-level tables in the output (as in etc/pymta.toml)
TOP_LEVEL_ORDER = ("server", "spool", "listeners", "tls", "limits", "dns", "queue", "stages",
                   "plugins", "backends", "routes")
_SECRET = re.compile(r"(^|_)(password|passphrase|secret|token)$")
#: keys naming a file or directory that are read as strings, not with
#: Options.path ([tls], [dns] hosts_file, the local backends' base): relative to
#: the config file's directory like every path in the config, written absolute
_PATH_KEY = re.compile(r"^(base|file|directory|path|map|certificate|key|chain)$"
                       r"|_(file|dir|directory|path)$")
_INDEXED = re.compile(r"(\w+)\[(\d+)\]")
HIDDEN = Comment('"********" (a secret: not shown)')
#: the password in a URL's user information (redis://:PASSWORD@host/0)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)[^@/\s]+@")
NOT_SET = Comment("(not set)")


def load_recorded(path: str, reactor: Any = None) -> tuple[Config, ReadRecorder]:
    """Load ``path`` as start-up does, recording what was read (ConfigError as start-up)."""
    with recording_reads() as recorder:
        config = load_config(path, reactor=reactor)
    return config, recorder


def effective_document(config: Config, recorder: ReadRecorder, *,
                       changed_only: bool = False) -> dict[str, Any]:
    """The configuration as a TOML document (a dict for :func:`pymta.config.toml_text.dumps`)."""
    top_options, _ = recorder.tables.get("", (None, {}))
    top_reads = top_options.reads if top_options is not None else {}
    root: dict[str, Any] = {}
    for scope, (options, fixed) in recorder.tables.items():
        if not scope:
            continue
        path = scope_path(scope)
        given_in_file = top_reads.get(path[0])
        if changed_only and (given_in_file is None or not given_in_file.given):
            continue                 # the whole table is the loader's default
        node = _node_at(root, path)
        # a plugin's use, then its options as read (defaults included), then any
        # given that it did not read through Options
        reads = {key: fixed[key] for key in ("use",) if key in fixed}
        if options is not None:
            reads.update(options.reads)
        reads.update((key, read) for key, read in fixed.items() if key not in reads)
        for read in reads.values():
            if (read.kind in ("value", "str") and _PATH_KEY.search(read.key)
                    and isinstance(read.value, str) and read.value):
                read = dataclasses.replace(read, value=_absolute(config, read.value))
            elif isinstance(read.value, (dict, list)):
                # tables inside an option (dkim_sign's keys = [{..., key = "dkim/x.key"}])
                read = dataclasses.replace(read, value=_nested_paths(config, read.value))
            if read.kind == "table":
                if read.given and read.key not in node and (read.value or not changed_only):
                    node[read.key] = _masked(_plain(read.value))
                continue
            if changed_only and not _changed(read):
                continue
            node[read.key] = _written(read)
    _derived_values(root, config, changed_only)
    if changed_only:
        _prune(root)
    return {key: root[key] for key in sorted(root, key=_top_level_rank)}


def scope_path(scope: str) -> list[str | int]:
    """``"listeners[0]"`` -> ["listeners", 0]; ``"tls.sni.mail.example.net"`` ->
    ["tls", "sni", "mail.example.net"]; ``"plugins.spf"`` -> ["plugins", "spf"]."""
    indexed = _INDEXED.fullmatch(scope)
    if indexed:
        return [indexed[1], int(indexed[2])]
    head, _, rest = scope.partition(".")
    if head == "tls" and rest.startswith("sni."):
        return ["tls", "sni", rest[4:]]
    return [head, rest] if rest else [head]


def _top_level_rank(key: str) -> tuple[int, str]:
    return (TOP_LEVEL_ORDER.index(key) if key in TOP_LEVEL_ORDER else len(TOP_LEVEL_ORDER), key)


def _node_at(root: dict[str, Any], path: list[str | int]) -> dict[str, Any]:
    node: Any = root
    for position, part in enumerate(path):
        following = path[position + 1] if position + 1 < len(path) else None
        if isinstance(part, int):
            while len(node) <= part:
                node.append({})
            node = node[part]
            continue
        if isinstance(following, int):
            if not isinstance(node.get(part), list):
                node[part] = []
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    """A value as TOML can hold it: tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _masked(value: Any) -> Any:
    """A value with its secrets hidden, at any depth: secret keys, passwords in URLs."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>********@", value)
    if isinstance(value, dict):
        return {k: HIDDEN if _SECRET.search(k) and v else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _changed(read: OptionRead) -> bool:
    if not read.given:
        return False
    if read.default is REQUIRED:
        return True
    return _plain(read.value) != _plain(read.default)


def _written(read: OptionRead) -> Any:
    value = read.value
    if _SECRET.search(read.key) and value:
        return HIDDEN
    if value is None:
        return NOT_SET
    if read.kind == "duration" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_duration(value)
    return _masked(_plain(value))


def _nested_paths(config: Config, value: Any) -> Any:
    """``value`` with the path-like keys of the tables in it made absolute."""
    if isinstance(value, dict):
        return {key: (_absolute(config, item) if _PATH_KEY.search(str(key)) and isinstance(item, str)
                      and item else _nested_paths(config, item)) for key, item in value.items()}
    if isinstance(value, list):
        return [_nested_paths(config, item) for item in value]
    return value


def _absolute(config: Config, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(config.source))
    return os.path.normpath(os.path.join(directory, os.path.expanduser(path)))


def _derived_values(root: dict[str, Any], config: Config, changed_only: bool) -> None:
    """Values the loader works out (plugin_path made absolute; defaults that depend on others)."""
    server = root.get("server")
    if isinstance(server, dict) and isinstance(server.get("plugin_path"), list):
        server["plugin_path"] = [_absolute(config, path) for path in server["plugin_path"]]
    if changed_only:
        return
    if isinstance(server, dict) and server.get("hostname") is NOT_SET:
        server["hostname"] = config.hostname
    for listener, node in zip(config.listeners, root.get("listeners") or []):
        if node.get("starttls") is NOT_SET:
            node["starttls"] = listener.starttls


def _prune(node: Any) -> bool:
    """Drop empty tables (changed_only); True if ``node`` is empty afterwards."""
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if isinstance(value, (dict, list)) and value and _prune(value):
                del node[key]
            elif isinstance(value, dict) and not value:
                del node[key]
        return not node
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for item in node:
            _prune(item)
        return all(not item for item in node)
    return False
