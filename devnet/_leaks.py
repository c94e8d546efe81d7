"""What a devnet must not leave behind: live processes and unreaped children (via /proc).

The devnet's own tests and the churn soak both assert these are empty after a teardown.
"""

from __future__ import annotations

import os
from pathlib import Path


def leftover_processes(needle: Path) -> list[str]:
    """Live (non-zombie) processes whose command line mentions ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(needle).encode() in raw:
            argv = raw.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {argv}")
    return found


def unreaped_children() -> list[int]:
    """Children of this process that exited but were never waited for."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == os.getpid() and state == "Z":
            found.append(int(entry.name))
    return found
