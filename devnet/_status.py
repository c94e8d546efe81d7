"""The status file every node process keeps in its data dir, and its parser.

Theory of operation: a node or bootstrap process rewrites ``DATA_DIR/status.json`` atomically
(temp file + rename) whenever its state changes. The launcher never asks a node whether it is
up; it reads this file, so the launcher needs no libp2p and works the same for a real node and
for the test stub. The file outlives its process (a SIGKILLed node leaves "online" behind), so
a reader must compare ``pid`` with the process it started before it trusts ``state``.

The file comes from another program, so it is checked field by field with real exceptions
(:class:`StatusFileError`), never ``assert``. Fields this parser does not know are ignored on
purpose, so a newer node can add some.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from devnet._errors import StatusFileError

STATUS_FILE = "status.json"

Role = Literal["node", "bootstrap"]
NodeState = Literal["joining", "online", "draining", "stopped"]

_ROLES: frozenset[str] = frozenset({"node", "bootstrap"})
_STATES: frozenset[str] = frozenset({"joining", "online", "draining", "stopped"})


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One snapshot of a node process's ``status.json``.

    Attributes:
        pid: the process that wrote it; compare with the pid you started.
        role: "node" (serving) or "bootstrap".
        peer_id: the libp2p peer id, stable across restarts with the same data dir.
        addrs: full multiaddrs, each ending in ``/p2p/<peer_id>``.
        state: "joining", "online", "draining" or "stopped".
        span: the served stages ``(start, end)``; ``None`` for a bootstrap or before a choice.
        model_id: the served model's id; ``None`` for a bootstrap.
        rebalances: how many times the node moved to another span (0 when the file has no
            such field: the stub, an older node).
    """

    pid: int
    role: Role
    peer_id: str
    addrs: tuple[str, ...]
    state: NodeState
    span: tuple[int, int] | None
    model_id: str | None
    rebalances: int = 0

    @property
    def online(self) -> bool:
        """Whether the process said it is ready (the launcher's readiness condition)."""
        return self.state == "online"

    @classmethod
    def from_json(cls, data: object, *, source: str = "status.json") -> NodeStatus:
        """Validate a decoded ``status.json``.

        Args:
            data: the decoded JSON value.
            source: where it came from, for the error message.

        Raises:
            StatusFileError: a required field is missing or mistyped.
        """

        def bad(what: str) -> StatusFileError:
            return _bad(source, what)

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        pid = data.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise bad(f"'pid' must be a positive integer, got {pid!r}")
        role = data.get("role")
        if role not in _ROLES:
            raise bad(f"'role' must be one of {sorted(_ROLES)}, got {role!r}")
        peer_id = data.get("peer_id")
        if not isinstance(peer_id, str) or not peer_id:
            raise bad(f"'peer_id' must be a non-empty string, got {peer_id!r}")
        addrs = data.get("addrs")
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise bad(f"'addrs' must be a list of strings, got {addrs!r}")
        suffix = f"/p2p/{peer_id}"
        for addr in addrs:
            if not addr.startswith("/") or not addr.endswith(suffix):
                raise bad(f"address {addr!r} is not a multiaddr ending in {suffix}")
        state = data.get("state")
        if state not in _STATES:
            raise bad(f"'state' must be one of {sorted(_STATES)}, got {state!r}")
        rebalances = data.get("rebalances", 0)
        if not isinstance(rebalances, int) or isinstance(rebalances, bool) or rebalances < 0:
            raise bad(f"'rebalances' must be an integer >= 0, got {rebalances!r}")
        return cls(
            pid=pid,
            role=cast(Role, role),
            peer_id=peer_id,
            addrs=tuple(addrs),
            state=cast(NodeState, state),
            span=_parse_span(data.get("span"), source),
            model_id=_parse_model_id(data.get("model_id"), source),
            rebalances=rebalances,
        )


def _bad(source: str, what: str) -> StatusFileError:
    return StatusFileError(f"{source}: {what} (see the devnet process contract)")


def _parse_span(value: object, source: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    ):
        return (value[0], value[1])
    raise _bad(source, f"'span' must be null or [start, end], 0 <= start < end, got {value!r}")


def _parse_model_id(value: object, source: str) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise _bad(source, f"'model_id' must be null or a non-empty string, got {value!r}")


def read_status(data_dir: Path) -> NodeStatus | None:
    """Read and validate ``data_dir/status.json``.

    Returns:
        The status, or ``None`` when the process has not written one yet.

    Raises:
        StatusFileError: the file exists but is not what the contract describes. Writes are
            atomic by contract, so a half-written file is a node bug, not a race to retry.
    """
    path = data_dir / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StatusFileError(f"{path}: cannot read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StatusFileError(
            f"{path}: not JSON ({exc}); the contract asks for temp file + rename"
        ) from exc
    return NodeStatus.from_json(data, source=str(path))
