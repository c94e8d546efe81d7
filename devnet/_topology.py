"""``devnet.json``: the running devnet's topology, for commands run from another terminal.

The launcher rewrites ``ROOT/devnet.json`` (atomically: temp file + rename) whenever a process
starts or comes online, so even a launcher that crashed mid-start leaves enough behind for
``shardnet devnet down`` to find and stop what it started. Scenario commands (``kill``,
``restart``, ``cut-off``, ...) read it to find a node's pid, command and network namespace.

The file is ours but may be stale or hand-edited, so it is validated like any outside input.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from devnet._errors import DevnetError
from devnet._status import Role

TOPOLOGY_FILE = "devnet.json"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One devnet process as ``devnet.json`` records it.

    Attributes:
        name: "bootstrap" or "node-N".
        index: N for a serving node, ``None`` for the bootstrap.
        role: "node" or "bootstrap".
        pid: the current process, ``None`` before it started.
        peer_id: known once it wrote its status file.
        addrs: its full multiaddrs from its status file.
        listen: the listen multiaddr it was given.
        data_dir: its data dir (identity, status.json).
        log: its log file (stdout and stderr).
        command: the full argv, ``ip netns exec`` prefix included: ``restart`` reruns it.
        netns: its network namespace in ``--netns`` mode.
        veth: the root-namespace end of its link (taken down by ``cut-off``).
    """

    name: str
    index: int | None
    role: Role
    pid: int | None
    peer_id: str | None
    addrs: tuple[str, ...]
    listen: str
    data_dir: Path
    log: Path
    command: tuple[str, ...]
    netns: str | None = None
    veth: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings, tuples as lists)."""
        out = asdict(self)
        out.update(data_dir=str(self.data_dir), log=str(self.log), addrs=list(self.addrs),
                   command=list(self.command))
        return out

    @classmethod
    def from_json(cls, data: object, *, source: str) -> ProcessRecord:
        """Validate one decoded record.

        Raises:
            DevnetError: a field is missing or mistyped.
        """
        if not isinstance(data, dict):
            raise DevnetError(f"{source}: a process record must be an object")
        d = cast(dict[str, object], data)

        def opt(key: str, kind: type) -> Any:
            value = d.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise DevnetError(f"{source}: {key!r} must be {kind.__name__} or null")
            return value

        def strings(key: str) -> tuple[str, ...]:
            value = d.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DevnetError(f"{source}: {key!r} must be a list of strings")
            return tuple(value)

        for key in ("name", "listen", "data_dir", "log"):
            if not isinstance(d.get(key), str):
                raise DevnetError(f"{source}: {key!r} must be a string")
        role = d.get("role")
        if role not in ("node", "bootstrap"):
            raise DevnetError(f"{source}: 'role' must be 'node' or 'bootstrap'")
        return cls(
            name=str(d["name"]),
            index=opt("index", int),
            role=role,
            pid=opt("pid", int),
            peer_id=opt("peer_id", str),
            addrs=strings("addrs"),
            listen=str(d["listen"]),
            data_dir=Path(str(d["data_dir"])),
            log=Path(str(d["log"])),
            command=strings("command"),
            netns=opt("netns", str),
            veth=opt("veth", str),
        )


@dataclass(frozen=True, slots=True)
class Topology:
    """The whole devnet as ``devnet.json`` records it.

    Attributes:
        root: the run directory.
        launcher_pid: the process that started it (a foreground ``up`` to signal on ``down``).
        detached: whether the processes run in their own sessions, without a launcher.
        netns_tag: the tag naming its namespaces and links in ``--netns`` mode, else ``None``.
        bootstrap: the bootstrap process.
        nodes: the serving nodes, by index.
    """

    root: Path
    launcher_pid: int
    detached: bool
    netns_tag: str | None
    bootstrap: ProcessRecord
    nodes: tuple[ProcessRecord, ...]

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        """The bootstrap, then the nodes."""
        return (self.bootstrap, *self.nodes)

    def find(self, target: int | None) -> ProcessRecord:
        """The node with index ``target``, or the bootstrap for ``None``.

        Raises:
            DevnetError: no such node.
        """
        if target is None:
            return self.bootstrap
        if not 0 <= target < len(self.nodes):
            raise DevnetError(
                f"no node {target} in {self.root}: it has nodes 0..{len(self.nodes) - 1}"
            )
        return self.nodes[target]

    def with_record(self, record: ProcessRecord) -> Topology:
        """A copy with ``record`` replacing the process of the same name."""
        if record.index is None:
            return replace(self, bootstrap=record)
        nodes = tuple(record if n.index == record.index else n for n in self.nodes)
        return replace(self, nodes=nodes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "version": _VERSION,
            "root": str(self.root),
            "launcher_pid": self.launcher_pid,
            "detached": self.detached,
            "netns_tag": self.netns_tag,
            "bootstrap": self.bootstrap.to_json(),
            "nodes": [n.to_json() for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: object, *, source: str) -> Topology:
        """Validate a decoded ``devnet.json``.

        Raises:
            DevnetError: a field is missing or mistyped, or the version is unknown.
        """
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise DevnetError(f"{source}: not a version-{_VERSION} devnet.json")
        d = cast(dict[str, object], data)
        pid, detached, tag = d.get("launcher_pid"), d.get("detached"), d.get("netns_tag")
        nodes = d.get("nodes")
        if not isinstance(d.get("root"), str) or not isinstance(pid, int):
            raise DevnetError(f"{source}: 'root' and 'launcher_pid' are required")
        if not isinstance(detached, bool) or not (tag is None or isinstance(tag, str)):
            raise DevnetError(f"{source}: 'detached' must be a bool, 'netns_tag' a string")
        if not isinstance(nodes, list):
            raise DevnetError(f"{source}: 'nodes' must be a list")
        return cls(
            root=Path(str(d["root"])),
            launcher_pid=pid,
            detached=detached,
            netns_tag=tag,
            bootstrap=ProcessRecord.from_json(d.get("bootstrap"), source=source),
            nodes=tuple(ProcessRecord.from_json(n, source=source) for n in nodes),
        )


def write_topology(topology: Topology) -> None:
    """Write ``ROOT/devnet.json`` atomically, so a reader never sees half of it."""
    path = topology.root / TOPOLOGY_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(topology.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_topology(root: Path) -> Topology | None:
    """Read ``ROOT/devnet.json``.

    Returns:
        The topology, or ``None`` when no devnet was started in ``root`` (or it was taken down).

    Raises:
        DevnetError: the file exists but cannot be parsed.
    """
    path = root / TOPOLOGY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DevnetError(f"{path}: not JSON ({exc})") from exc
    return Topology.from_json(data, source=str(path))


def remove_topology(root: Path) -> None:
    """Delete ``ROOT/devnet.json`` once nothing it names is left running."""
    (root / TOPOLOGY_FILE).unlink(missing_ok=True)
