"""The [[listeners]] and [tls] tables: sockets, roles, STARTTLS, implicit TLS, AUTH."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from twisted.internet.endpoints import serverFromString

from pymta.config.model import CertificatePaths, Listener, TLSSettings
from pymta.config.errors import OptionError
from pymta.config.options import Options, describe_value

ROLES = ("mx", "submission", "submissions")
DEFAULT_LISTENERS = [{"name": "mx", "endpoint": "tcp:2525:interface=127.0.0.1", "role": "mx"}]
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

# what each role does unless the listener says otherwise
_ROLE_DEFAULTS = {
    "mx": {"starttls": None, "auth": False, "require_tls": False, "require_auth": False},
    "submission": {"starttls": True, "auth": True, "require_tls": True, "require_auth": True},
    "submissions": {"starttls": False, "auth": True, "require_tls": False, "require_auth": True},
}


def read_tls(builder, table: Mapping[str, Any] | None) -> TLSSettings | None:
    """[tls]: None when absent (STARTTLS simply not offered)."""
    if table is None:
        return None
    with builder.section("tls"):
        opts = Options(table)
        default = _paths(builder, opts, "tls")
        min_version = opts.str("min_version", default="TLSv1.2", choices=TLS_VERSIONS)
        ciphers = opts.str("ciphers", default=None)
        sni_tables = opts.table("sni", {})
        opts.finish()
    sni = {}
    for name, sub in sni_tables.items():
        with builder.section(f"tls.sni.{name}"):
            if not isinstance(sub, Mapping):
                builder.fail(f"tls.sni.{name}", f"expected a table, got {describe_value(sub)}")
            sub_opts = Options(sub)
            sni[name.lower()] = _paths(builder, sub_opts, f"tls.sni.{name}")
            sub_opts.finish()
    settings = TLSSettings(default=default, sni=sni, min_version=min_version, ciphers=ciphers)
    _check_loadable(builder, settings)
    return settings


def _paths(builder, opts: Options, prefix: str) -> CertificatePaths:
    paths = []
    for key in ("certificate", "key", "chain"):
        value = opts.str(key, default=None) if key == "chain" else opts.str(key)
        if value is not None:
            value = builder.resolve(value)
            if not os.access(value, os.R_OK):
                reason = "does not exist" if not os.path.exists(value) else "is not readable"
                builder.fail(f"{prefix}.{key}", f"file {value} {reason}")
        paths.append(value)
    return CertificatePaths(*paths)


def _check_loadable(builder, settings: TLSSettings) -> None:
    """Build the contexts once, so a bad PEM file stops start-up naming the file."""
    from pymta.server.tls import TLSFileError, server_tls
    try:
        server_tls(settings)
    except TLSFileError as e:
        builder.fail("tls", str(e))
    except Exception as e:   # OpenSSL rejecting the cipher string, ...
        builder.fail("tls", f"{type(e).__name__}: {e}")


def read_listeners(builder, value: Any, tls: TLSSettings | None, has_auth: bool) -> tuple[Listener, ...]:
    if value is None:
        value = DEFAULT_LISTENERS
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        builder.fail("listeners", "expected an array of tables ([[listeners]] sections), "
                                  f"got {describe_value(value)}")
    if not value:
        builder.fail("listeners", "at least one listener is required")
    listeners: list[Listener] = []
    names: dict[str, int] = {}
    for index, table in enumerate(value):
        prefix = f"listeners[{index}]"
        with builder.section(prefix):
            opts = Options(table)
            name = opts.str("name", default=f"listener-{index}")
            endpoint = opts.str("endpoint")
            role = opts.str("role", default="mx", choices=ROLES)
            defaults = _ROLE_DEFAULTS[role]
            starttls = opts.bool("starttls", default=defaults["starttls"])
            auth = opts.bool("auth", default=defaults["auth"])
            auth_plaintext = opts.bool("auth_plaintext", default=False)
            require_tls = opts.bool("require_tls", default=defaults["require_tls"])
            require_auth = opts.bool("require_auth", default=defaults["require_auth"])
            proxy_protocol = opts.bool("proxy_protocol", default=False)
            proxy_networks = _networks(opts.list_str("proxy_networks", default=[]), "proxy_networks")
            proxy_timeout = opts.duration("proxy_timeout", Listener.proxy_timeout, above=0,
                                          maximum=3600)
            opts.finish()
        if name in names:
            builder.fail(f"{prefix}.name", f"duplicate listener name {name!r} "
                                           f"(also listeners[{names[name]}])")
        names[name] = index
        if endpoint.strip().lower().startswith("haproxy:"):
            builder.fail(f"{prefix}.endpoint",
                         "the haproxy: endpoint accepts a PROXY header from any peer; use the "
                         "plain endpoint with proxy_protocol = true and proxy_networks = [...]")
        problem = endpoint_problem(builder.reactor, endpoint)
        if problem:
            builder.fail(f"{prefix}.endpoint", problem)
        if proxy_protocol and not proxy_networks:
            builder.fail(f"{prefix}.proxy_networks",
                         "proxy_protocol = true needs proxy_networks: the addresses of the load "
                         "balancers whose PROXY header is believed (for example [\"10.0.0.5/32\"])")
        if proxy_networks and not proxy_protocol:
            builder.fail(f"{prefix}.proxy_networks", "set, but proxy_protocol is not true")
        implicit = role == "submissions"
        if starttls is None:                 # mx: offer STARTTLS when there is a certificate
            starttls = tls is not None
        if (starttls or implicit) and tls is None:
            what = "implicit TLS" if implicit else "STARTTLS"
            builder.fail(f"{prefix}.role" if implicit or defaults["starttls"] else f"{prefix}.starttls",
                         f"{what} needs a certificate: add a [tls] table with certificate and key")
        if require_tls and not (starttls or implicit):
            builder.fail(f"{prefix}.require_tls", "TLS is required but this listener offers none")
        if auth and not has_auth:
            builder.fail(f"{prefix}.auth", "AUTH needs at least one credential checker in "
                                           "[stages] auth (for example a passwdfile plugin)")
        if require_auth and not auth:
            builder.fail(f"{prefix}.require_auth", "AUTH is required but not offered (auth = false)")
        listeners.append(Listener(name=name, endpoint=endpoint, role=role,
                                  starttls=starttls and not implicit, implicit_tls=implicit,
                                  auth=auth, auth_plaintext=auth_plaintext,
                                  require_tls=require_tls and not implicit, require_auth=require_auth,
                                  proxy_protocol=proxy_protocol, proxy_networks=proxy_networks,
                                  proxy_timeout=proxy_timeout))
    return tuple(listeners)


def _networks(texts: list[str], key: str) -> tuple[Any, ...]:
    networks = []
    for index, text in enumerate(texts):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as e:
            raise OptionError(f"{key}[{index}]", f"not a network in CIDR notation: {e}") from None
    return tuple(networks)


def endpoint_problem(reactor, description: str) -> str | None:
    """Why ``description`` is not a server endpoint string (parsed, never listened on)."""
    try:
        serverFromString(reactor, description)
    except Exception as e:
        detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        if isinstance(e, (IndexError, KeyError)) and description.strip().startswith("systemd:"):
            detail = (f"no socket inherited from systemd with that index or name ({detail}); "
                      "is the service socket-activated?")
        return f"invalid endpoint {description!r}: {detail}"
    return None
