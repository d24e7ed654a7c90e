"""Find the processes a test started by what their command lines mention."""

from __future__ import annotations

import os
from pathlib import Path


def pids_mentioning(*markers: str) -> list[int]:
    """Pids of the live processes whose command line contains every marker.

    Reads Linux ``/proc``; a process that ends while it is read is skipped.
    """
    wanted = [marker.encode() for marker in markers]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if all(marker in cmdline for marker in wanted):
            pids.append(int(entry))
    return pids
