"""Peak memory of a process, as Linux counts it for that process alone."""
from __future__ import annotations

import os
from pathlib import Path


def peak_rss(pid: int | None = None) -> int:
    """Peak resident set (VmHWM) of a process (default: this one), in bytes; 0 where /proc has none.
    Not ru_maxrss: Linux carries that across fork and exec, so a server started by a 5 GB test
    process would report the test's peak as its own."""
    try:
        lines = Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:")), 0)
