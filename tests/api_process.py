"""A real `teegpu api` (or `teegpu proxy`) process for the tests, on a free loopback port."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

READY = "teegpu api ready on "


class ApiProcess:
    ready = READY

    def __init__(self, *args: str, timeout_s: float = 300, wait: bool = True, launcher: list[str] | None = None):
        """`launcher`: what runs instead of `python -m teegpu.cli api` (it gets the same arguments)."""
        port = [] if "--port" in args else ["--port", "0"]
        self.start([sys.executable, *(launcher or ["-m", "teegpu.cli", "api"]), "--host", "127.0.0.1", *port, *args],
                   timeout_s, wait)

    def start(self, cmd: list[str], timeout_s: float, wait: bool) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.url = self._wait_ready(timeout_s) if wait else None

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            self.stdout.append(line)
            if line.startswith(self.ready):
                return line[len(self.ready):].split()[0]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"{self.ready.split(' ready')[0]} did not become ready: {''.join(self.stdout)[-1000:]}"
                           f"{''.join(self.stderr)[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class ProxyProcess(ApiProcess):
    """`teegpu proxy --upstream URL ARGS...` listening on a free loopback port."""

    ready = "teegpu proxy ready on "

    def __init__(self, upstream: str, *args: str, timeout_s: float = 60, wait: bool = True):
        self.start([sys.executable, "-m", "teegpu.cli", "proxy", "--upstream", upstream, "--listen", "127.0.0.1:0",
                    *args], timeout_s, wait)

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        """For a proxy expected to exit by itself: its status and all it printed."""
        self.proc.wait(timeout_s)
        rest = self.proc.stdout.read()
        time.sleep(0.1)  # the stderr reader's last lines
        return self.proc.returncode, "".join(self.stdout) + rest + "".join(self.stderr)
