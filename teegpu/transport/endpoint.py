"""Endpoints: the transport is derived from the address, never configured twice."""
from __future__ import annotations

import os
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


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def same_host_reason(endpoint: Endpoint) -> str | None:
    """Why a shared-memory region cannot reach this endpoint's server, or None if it can."""
    if endpoint.transport == "tcp":
        host = endpoint.url.partition("://")[2].rpartition(":")[0]
        if host not in LOCAL_HOSTS:
            return f"the server at {host} is not known to be on this host (use a loopback address)"
    if not os.path.isdir("/dev/shm"):
        return "this machine has no /dev/shm"
    return None
