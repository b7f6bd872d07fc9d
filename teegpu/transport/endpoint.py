"""Endpoints: the transport is derived from the address, never configured twice."""
from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass

from teegpu.errors import ConfigError

TRANSPORTS = ("tcp", "ipc")


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    transport: str  # "tcp" or "ipc"


def parse_endpoint(url: str) -> Endpoint:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in TRANSPORTS or not rest:
        raise ConfigError(f"endpoint {url!r}: expected tcp://HOST:PORT or ipc:///PATH")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port == "*" or port.isdigit()):
            raise ConfigError(f"endpoint {url!r}: tcp needs HOST:PORT")
    return Endpoint(url, scheme)


def private_endpoint() -> str:
    """A fresh ipc:// path only this user can reach, for a server we spawn."""
    path = os.path.join(tempfile.gettempdir(), f"teegpu-{os.getpid()}-{secrets.token_hex(4)}.sock")
    return f"ipc://{path}"
