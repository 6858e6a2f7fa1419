"""Resident-memory readings shared by the benchmarks (Linux /proc, with a getrusage fallback)."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def rss_mib() -> float:
    """Resident set size now (Linux /proc; elsewhere the peak so far, which understates later growth)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_mib()


def peak_mib() -> float:
    """Peak resident set size of this process image.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``, which survives ``fork`` + ``exec``: a worker
    started by a parent holding 1 GiB would report a 1 GiB peak however little it used itself.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
