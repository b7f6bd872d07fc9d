"""Start a GPU server as a child process (the one-command demo, tests, benchmarks)."""
from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time

from teegpu.errors import ServerUnavailable
from teegpu.config import EngineConfig, ServerConfig

READY_PREFIX = "teegpu server ready on "


def private_endpoint() -> str:
    """A fresh ipc:// path only this user can reach, for a server we spawn."""
    path = os.path.join(tempfile.gettempdir(), f"teegpu-{os.getpid()}-{secrets.token_hex(4)}.sock")
    return f"ipc://{path}"


def private_server(config: EngineConfig) -> ServerProcess | None:
    """The GPU server a trusted process starts for itself (neither --server nor --local), or None.
    Started before the caller loads (the `teegpu` command: before it imports torch), so that
    both load at once."""
    if config.local or config.server is not None:
        return None
    return ServerProcess(ServerConfig(model=config.model, endpoint=private_endpoint(), device=config.device,
                                      dtype=config.dtype, privacy=config.privacy))


class ServerProcess:
    """A `teegpu serve` child; `endpoint` is where it listens once `wait_ready` returns."""

    def __init__(self, config: ServerConfig, extra_env: dict | None = None):
        if config.parent_pid is None:  # a private server never outlives the process that started it
            config = dataclasses.replace(config, parent_pid=os.getpid())
        cmd = [sys.executable, "-m", "teegpu.cli", "serve", *config.to_argv()]
        env = {**os.environ, **(extra_env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.endpoint: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX) and self.endpoint is None:
                self.endpoint = line[len(READY_PREFIX):].split()[0]
                self._ready.set()
            else:
                sys.stderr.write(line)
        self._ready.set()  # EOF: the process ended

    def wait_ready(self, timeout_s: float = 600.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(f"server did not become ready within {timeout_s:.0f} s")
        if self.endpoint is None:
            code = self.proc.wait()
            raise ServerUnavailable(f"server process exited with code {code} before it was ready")
        return self.endpoint

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
