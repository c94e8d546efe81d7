"""Network namespaces for ``--netns`` mode: one per process, joined by a bridge.

Theory of operation::

    root namespace: bridge snb<tag>  10.77.K.1/24
        +-- veth snv<tag>b   <-> eth0 in netns shardnet-<tag>-boot  10.77.K.2   (bootstrap)
        +-- veth snv<tag>n0  <-> eth0 in netns shardnet-<tag>-n0    10.77.K.10  (node 0)
        +-- veth snv<tag>n1  <-> eth0 in netns shardnet-<tag>-n1    10.77.K.11  (node 1) ...

Every process, the bootstrap included, gets its own namespace and address, so any of them can
be cut off, and each has a whole port space to itself (everyone listens on port 4001). The
bridge's address lets programs in the root namespace (a client, the tests) reach the nodes.
Namespaces get no default route: devnet traffic stays on the bridge.

``<tag>`` is a hash of the run directory. The same run directory always maps to the same names,
so whatever a crashed run left behind is found and removed by the next run or by
``devnet down``; two run directories never collide. ``K`` is the lowest /24 of 10.77.0.0/16
that no interface in the root namespace uses yet, so two live devnets do not share a subnet.
Interface names stay within Linux's 15 characters.

All changes go through ``ip -batch``, so a devnet of N nodes costs N + 2 ``ip`` processes.
Teardown is idempotent (``ip -force``: it removes whatever of ours exists and ignores the rest)
and must run after the processes inside are gone, or a namespace outlives its name.

Cutting a node off sets the root-side end of its veth down: the node's own stack stays up and
its packets go nowhere, like a pulled cable (connections hang rather than reset).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from devnet._errors import DevnetError

#: Every process listens on this port inside its own namespace.
NETNS_PORT = 4001
#: Nodes get 10.77.K.(10 + i), so at most 244 fit a /24; keep a margin.
MAX_NETNS_NODES = 200
_FIRST_NODE_HOST = 10
_NEEDS = "--netns needs root and iproute2 (ip netns)"


@dataclass(frozen=True, slots=True)
class NetnsPlan:
    """The names and addresses of one devnet's namespaces (pure: creates nothing).

    Attributes:
        tag: 6 hex digits from the run directory's path.
        subnet: ``K`` in 10.77.K.0/24.
        nodes: how many serving nodes.
    """

    tag: str
    subnet: int
    nodes: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{6}", self.tag):
            raise DevnetError(f"netns tag must be 6 hex digits, got {self.tag!r}")
        if not 0 <= self.subnet <= 255:
            raise DevnetError(f"subnet must be in 0..255, got {self.subnet}")
        if not 1 <= self.nodes <= MAX_NETNS_NODES:
            raise DevnetError(f"--netns supports 1..{MAX_NETNS_NODES} nodes, got {self.nodes}")

    @staticmethod
    def tag_for(root: Path) -> str:
        """The tag of a run directory: stable across runs, distinct between directories."""
        return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]

    @property
    def bridge(self) -> str:
        """The bridge in the root namespace."""
        return f"snb{self.tag}"

    @property
    def gateway(self) -> str:
        """The bridge's address, reachable from every namespace and from the root one."""
        return f"10.77.{self.subnet}.1"

    def namespace(self, index: int | None) -> str:
        """The namespace of node ``index`` (``None``: the bootstrap)."""
        return f"shardnet-{self.tag}-" + ("boot" if index is None else f"n{index}")

    def veth(self, index: int | None) -> str:
        """The root-namespace end of the veth pair of node ``index`` (``None``: bootstrap)."""
        return f"snv{self.tag}" + ("b" if index is None else f"n{index}")

    def address(self, index: int | None) -> str:
        """The IPv4 address of node ``index`` (``None``: the bootstrap)."""
        host = 2 if index is None else _FIRST_NODE_HOST + index
        return f"10.77.{self.subnet}.{host}"

    @property
    def members(self) -> tuple[int | None, ...]:
        """The bootstrap (``None``) and every node index."""
        return (None, *range(self.nodes))


def wrap(namespace: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``namespace``.

    ``ip netns exec`` execs the command, so the pid we get is the node's own pid: signals and
    the ``pid`` in ``status.json`` line up as in process mode.
    """
    return ["ip", "netns", "exec", namespace, *argv]


def check_support() -> None:
    """Fail early, with a clear reason, when namespaces cannot be used here.

    Raises:
        DevnetError: not root, or no ``ip`` binary.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise DevnetError(f"{_NEEDS}: this process is not root (try sudo)")
    if shutil.which("ip") is None:
        raise DevnetError(f"{_NEEDS}: no 'ip' on PATH (install iproute2)")


async def _ip(args: Sequence[str], *, batch: Sequence[str] = (), force: bool = False) -> str:
    """Run ``ip ARGS`` (with ``-batch -`` when ``batch`` holds commands); return stdout.

    Raises:
        DevnetError: ``ip`` failed (unless ``force``), quoting its stderr.
    """
    argv = ["ip", *(["-force"] if force else []), *args]
    stdin = b""
    if batch:
        argv += ["-batch", "-"]
        stdin = ("\n".join(batch) + "\n").encode()
    try:
        done = await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False)
    except OSError as exc:
        raise DevnetError(f"{_NEEDS}: cannot run ip ({exc})") from exc
    if done.returncode != 0 and not force:
        err = done.stderr.decode(errors="replace").strip()
        raise DevnetError(f"{' '.join(argv)} failed: {err or f'exit {done.returncode}'}")
    return done.stdout.decode(errors="replace")


async def _our_objects(tag: str) -> tuple[list[str], list[str]]:
    """The namespaces and links of ours (by tag) that exist now."""
    namespaces = [
        line.split()[0]
        for line in (await _ip(["netns", "list"])).splitlines()
        if line.startswith(f"shardnet-{tag}-")
    ]
    links = []
    for line in (await _ip(["-o", "link", "show"])).splitlines():
        # "7: snvabc123n0@if2: <BROADCAST,...> ..."
        parts = line.split(":", 2)
        name = parts[1].strip().split("@")[0] if len(parts) > 2 else ""
        if name.startswith((f"snv{tag}", f"snb{tag}")):
            links.append(name)
    return namespaces, links


async def pick_subnet() -> int:
    """The lowest ``K`` such that no root-namespace interface has an address in 10.77.K.0/24.

    Raises:
        DevnetError: all 256 are taken.
    """
    used = {int(m) for m in re.findall(r"inet 10\.77\.(\d+)\.", await _ip(["-4", "-o", "addr"]))}
    for k in range(256):
        if k not in used:
            return k
    raise DevnetError("no free /24 left in 10.77.0.0/16 for the devnet bridge")


async def create(plan: NetnsPlan) -> None:
    """Create the bridge, one namespace and veth pair per process, and their addresses.

    On failure whatever was created is removed before the error propagates.

    Raises:
        DevnetError: an ``ip`` command failed.
    """
    root_cmds = [
        f"link add {plan.bridge} type bridge",
        f"addr add {plan.gateway}/24 dev {plan.bridge}",
        f"link set {plan.bridge} up",
    ]
    for i in plan.members:
        ns, veth = plan.namespace(i), plan.veth(i)
        root_cmds += [
            f"netns add {ns}",
            f"link add {veth} type veth peer name eth0 netns {ns}",
            f"link set {veth} master {plan.bridge}",
            f"link set {veth} up",
        ]
    created = False
    try:
        await _ip([], batch=root_cmds)
        for i in plan.members:
            await _ip(["-n", plan.namespace(i)], batch=[
                "link set lo up",
                f"addr add {plan.address(i)}/24 dev eth0",
                "link set eth0 up",
            ])
        created = True
    finally:
        if not created:
            with trio.CancelScope(shield=True):
                await teardown(plan.tag)


async def teardown(tag: str) -> None:
    """Remove every namespace, veth and bridge named with ``tag``; ignore what is missing.

    Call it only once the processes inside are gone: a namespace lives on while a process
    holds it, even after its name is deleted.
    """
    namespaces, links = await _our_objects(tag)
    # Deleting one end of a veth deletes both; the bridge goes last, namespaces after it.
    links.sort(key=lambda name: name.startswith(f"snb{tag}"))
    cmds = [f"link del {name}" for name in links] + [f"netns del {ns}" for ns in namespaces]
    if cmds:
        await _ip([], batch=cmds, force=True)
    namespaces, links = await _our_objects(tag)
    if namespaces or links:
        raise DevnetError(f"could not remove {namespaces + links}; remove them with `ip`")


async def set_link(veth: str, *, up: bool) -> None:
    """Bring a node's root-side veth up or down (reconnect / cut off).

    Raises:
        DevnetError: the link does not exist (the devnet is gone) or ``ip`` failed.
    """
    await _ip(["link", "set", veth, "up" if up else "down"])


def link_is_up(veth: str) -> bool:
    """Whether a root-side veth is administratively up (for ``devnet status``)."""
    try:
        flags = int(Path(f"/sys/class/net/{veth}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)  # IFF_UP

