"""The delivery worker's pidfile: `serve`'s supervisor writes the pid of the worker it runs into the
file named by PIDFILE_ENV, and each web process's /readyz reads it to say whether the worker lives."""

from __future__ import annotations

import os
from pathlib import Path

PIDFILE_ENV = "REFINER_SOURCE_DELIVERY_PIDFILE"


def worker_running(pidfile: str) -> bool:
    """Whether the pid in `pidfile` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        pid = int(Path(pidfile).read_text())
    except (OSError, ValueError):
        return False
    if os.path.isdir("/proc/self"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] not in "ZX"
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
