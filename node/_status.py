"""`status.json` in a node's data directory: what the devnet (and people) read about a node.

Written atomically (temp file + rename) on every state change, so a reader never sees half a
file. Fields: pid, role, peer_id, addrs (full multiaddrs ending in /p2p/<id>), state
(joining/online/draining/stopped), span ([a, b] or null: the span served now, or being loaded
while joining — a node that moves rewrites it), model_id, rebalances (how many times the node
moved to another span), wakes (how many sleeps — clock jumps — it noticed).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_status(data_dir: Path, **fields: Any) -> None:
    """Atomically replace `data_dir/status.json` with `fields` (plus the pid)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"pid": os.getpid(), **fields}, indent=1).encode()
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".status-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, data_dir / "status.json")
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The last status a node wrote, or None."""
    try:
        data = json.loads((data_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
