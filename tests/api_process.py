"""A real `teegpu api` process for the tests, on a free loopback port."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

READY = "teegpu api ready on "


class ApiProcess:
    def __init__(self, *args: str, timeout_s: float = 300, wait: bool = True, launcher: list[str] | None = None):
        """`launcher`: what runs instead of `python -m teegpu.cli api` (it gets the same arguments)."""
        port = [] if "--port" in args else ["--port", "0"]
        cmd = [sys.executable, *(launcher or ["-m", "teegpu.cli", "api"]), "--host", "127.0.0.1", *port, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.url = self._wait_ready(timeout_s) if wait else None

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            if line.startswith(READY):
                return line[len(READY):].split()[0]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"teegpu api did not become ready: {''.join(self.stderr)[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()
