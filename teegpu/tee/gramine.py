"""Knowing when the trusted side runs inside Gramine, where some transports cannot reach the host."""
from __future__ import annotations

from teegpu.errors import ConfigError
from teegpu.options import under_gramine


def check_endpoint_reachable(url: str) -> None:
    """Refuse ipc:// inside Gramine: its unix sockets stay inside the enclave and never reach the host."""
    if "ipc://" in url and under_gramine():
        raise ConfigError(f"{url}: inside Gramine, ipc:// sockets stay in the enclave and cannot reach the GPU "
                          "server on the host; use tcp://HOST:PORT (add --data-plane shm for /dev/shm)")
