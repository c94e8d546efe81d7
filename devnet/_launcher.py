"""The devnet: a bootstrap and N serving nodes as local processes, owned by one ``async with``.

Theory of operation.

Enter:
  1. Refuse when ``ROOT/devnet.json`` names processes that still run: another devnet lives
     in this run directory, and starting would steal its data dirs.
  2. ``--netns``: check for root and ``ip``, remove what a crashed run of this root left
     behind, pick a free subnet, create one namespace per process (see ``_netns``).
  3. Start the bootstrap and poll its ``status.json`` until it is online with our pid; then
     start every node with ``--bootstrap`` set to the bootstrap's addrs, and poll until all of
     them are online. A process that exits first, or a ``ready_timeout``, raises
     :class:`DevnetError` quoting the tail of a log.
  ``devnet.json`` is rewritten after every start and every readiness, so a launcher killed
  mid-start still leaves enough for ``shardnet devnet down``.

Exit (normal, error or cancellation), shielded from cancellation:
  stop every process this devnet ever started, all at once (SIGTERM + SIGCONT, SIGKILL after
  ``stop_grace`` s, reap); stop any other process ``devnet.json`` names (a node restarted from
  another terminal); remove the namespaces; delete ``devnet.json``.

  With ``detach=True`` and a body that finished cleanly, nothing is stopped: the processes were
  started in their own sessions and live on, and ``devnet.json`` and the namespaces stay for
  ``shardnet devnet down``.

The context owns its processes directly rather than through supervisor tasks in a nursery: no
task has anything to do while a node runs (readiness and liveness are polled), and a nursery
around the body would wrap the caller's own exceptions in ``ExceptionGroup``. Nothing outlives
the context unless it was detached on purpose.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

import trio

from devnet import _netns
from devnet._commands import CommandBuilder, check_span, listen_multiaddr, node_command
from devnet._errors import DevnetError
from devnet._netns import MAX_NETNS_NODES, NETNS_PORT, NetnsPlan
from devnet._node_handle import NodeHandle
from devnet._procs import (
    STOP_GRACE,
    not_online_message,
    owns,
    spawn,
    stop_pids,
    terminate,
    wait_online,
)
from devnet._status import Role
from devnet._topology import (
    Topology,
    read_topology,
    remove_topology,
    write_topology,
)

_log = logging.getLogger("devnet")
_LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class DevnetConfig:
    """What a :class:`Devnet` runs; checked before anything starts.

    Attributes:
        nodes: how many serving nodes (besides the bootstrap).
        root: the run directory: one data dir and one log per process, and ``devnet.json``.
        model: checkpoint folder for every node; ``None``: the embedded model.
        spans: one "auto" or "a:b" per node; empty: all "auto".
        netns: one network namespace (and address) per process.
        extra_args: passed through to every serving node.
        ready_timeout: seconds for the bootstrap, then all nodes, to come online.
        stop_grace: seconds between SIGTERM and SIGKILL on the way out.
        detach: start processes in their own sessions and leave them running after a clean
            exit of the ``async with`` body (``shardnet devnet up --detach``).
    """

    nodes: int
    root: Path
    model: Path | None = None
    spans: tuple[str, ...] = ()
    netns: bool = False
    extra_args: tuple[str, ...] = ()
    ready_timeout: float = 120.0
    stop_grace: float = STOP_GRACE
    detach: bool = False

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise DevnetError(f"a devnet needs at least one node, got {self.nodes}")
        if self.netns and self.nodes > MAX_NETNS_NODES:
            raise DevnetError(f"--netns supports at most {MAX_NETNS_NODES} nodes")
        if self.spans and len(self.spans) != self.nodes:
            raise DevnetError(f"{len(self.spans)} spans given for {self.nodes} nodes")
        for span in self.spans:
            check_span(span)
        if self.ready_timeout <= 0 or self.stop_grace < 0:
            raise DevnetError("ready_timeout must be > 0 and stop_grace >= 0")

    def span(self, index: int) -> str:
        """The span argument of node ``index``."""
        return self.spans[index] if self.spans else "auto"


class Devnet:
    """A bootstrap and ``nodes`` serving nodes on this machine, for ``async with``.

    Example::

        async with Devnet(3, root=Path("/tmp/run")) as net:
            net.nodes[0].kill()
            await net.nodes[0].restart()

    See :class:`DevnetConfig` for the arguments; ``node_command`` replaces how a process's
    argv is built (tests inject a stub node with it).
    """

    def __init__(
        self,
        nodes: int,
        *,
        root: Path,
        model: Path | None = None,
        spans: Sequence[str] | None = None,
        netns: bool = False,
        extra_args: Sequence[str] = (),
        node_command: CommandBuilder | None = None,
        ready_timeout: float = 120.0,
        stop_grace: float = STOP_GRACE,
        detach: bool = False,
    ) -> None:
        self.config = DevnetConfig(
            nodes=nodes, root=Path(root).resolve(), model=model, spans=tuple(spans or ()),
            netns=netns, extra_args=tuple(extra_args), ready_timeout=ready_timeout,
            stop_grace=stop_grace, detach=detach,
        )
        self._build: CommandBuilder = node_command or _default_builder
        self._bootstrap: NodeHandle | None = None
        self._nodes: list[NodeHandle] = []
        self._plan: NetnsPlan | None = None
        self._entered = False
        self._running = False

    @property
    def root(self) -> Path:
        """The run directory (absolute)."""
        return self.config.root

    @property
    def bootstrap(self) -> NodeHandle:
        """The bootstrap process."""
        if self._bootstrap is None:
            raise DevnetError("the devnet has not started")
        return self._bootstrap

    @property
    def bootstrap_addrs(self) -> tuple[str, ...]:
        """The bootstrap's full multiaddrs, as every node got them with ``--bootstrap``."""
        return self.bootstrap.addrs

    @property
    def nodes(self) -> list[NodeHandle]:
        """The serving nodes, by index."""
        return list(self._nodes)

    @property
    def netns_plan(self) -> NetnsPlan | None:
        """Namespace names and addresses in ``--netns`` mode, else ``None``."""
        return self._plan

    def topology(self) -> Topology:
        """The devnet as ``devnet.json`` records it."""
        return Topology(
            root=self.root, launcher_pid=os.getpid(), detached=self.config.detach,
            netns_tag=self._plan.tag if self._plan else None,
            bootstrap=self.bootstrap.record(), nodes=tuple(h.record() for h in self._nodes),
        )

    async def __aenter__(self) -> Devnet:
        if self._entered:
            raise DevnetError("a Devnet can be entered only once; make a new one")
        self._entered = True
        self.root.mkdir(parents=True, exist_ok=True)
        _refuse_if_running(self.root)  # before the try: its cleanup would stop the other one
        started = False
        try:
            await self._start()
            started = True
        finally:
            if not started:
                with trio.CancelScope(shield=True):
                    await self._teardown()
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._running = False
        if exc_type is None and self.config.detach:
            for handle in self._handles():
                handle._release()
            _log.info("devnet in %s detached; processes keep running", self.root)
            return
        with trio.CancelScope(shield=True):
            await self._teardown()

    async def _start(self) -> None:
        cfg = self.config
        if cfg.netns:
            _netns.check_support()
            tag = NetnsPlan.tag_for(self.root)
            await _netns.teardown(tag)  # whatever a crashed run of this root left behind
            self._plan = NetnsPlan(tag=tag, subnet=await _netns.pick_subnet(), nodes=cfg.nodes)
            await _netns.create(self._plan)
        boot = self._handle(None, port=self._ports(1)[0], bootstrap=())
        self._bootstrap = boot
        await self._launch([boot], fresh_log=True)
        addrs = boot.addrs
        if not addrs:
            raise DevnetError(f"the bootstrap is online but lists no addrs in {boot.data_dir}")
        # Ports chosen only now, right before use: the window for another program to take
        # one is as short as a choose-then-pass scheme allows.
        ports = self._ports(cfg.nodes)
        self._nodes = [self._handle(i, port=ports[i], bootstrap=addrs) for i in range(cfg.nodes)]
        await self._launch(self._nodes, fresh_log=True)
        _log.info("devnet up: bootstrap and %d nodes online in %s", cfg.nodes, self.root)

    def _ports(self, count: int) -> list[int]:
        if self._plan is not None:
            return [NETNS_PORT] * count  # every namespace has a port space of its own
        return _free_ports(_LOOPBACK, count)

    def _handle(self, index: int | None, *, port: int, bootstrap: Sequence[str]) -> NodeHandle:
        cfg, plan = self.config, self._plan
        name = "bootstrap" if index is None else f"node-{index}"
        role: Role = "bootstrap" if index is None else "node"
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        listen = listen_multiaddr(plan.address(index) if plan else _LOOPBACK, port)
        argv = self._build(
            role=role, data_dir=data_dir, listen=listen, bootstrap=tuple(bootstrap),
            model=cfg.model, span="auto" if index is None else cfg.span(index),
            extra_args=() if index is None else cfg.extra_args,
        )
        return NodeHandle(
            name=name, index=index, role=role, data_dir=data_dir,
            log_path=self.root / f"{name}.log", listen=listen,
            command=_netns.wrap(plan.namespace(index), argv) if plan else argv,
            netns=plan.namespace(index) if plan else None,
            veth=plan.veth(index) if plan else None,
            stop_grace=cfg.stop_grace, restarter=self._restart,
        )

    async def _launch(self, handles: Sequence[NodeHandle], *, fresh_log: bool) -> None:
        """Start ``handles`` and wait (``ready_timeout``) until they all are online."""
        for handle in handles:
            proc = await spawn(handle.command, name=handle.name, log=handle.log_path,
                               fresh_log=fresh_log, new_session=self.config.detach)
            handle._started(proc)
            _log.info("started %s pid %d", handle.name, handle.pid)
        write_topology(self.topology())
        launched = [h._launched() for h in handles]
        with trio.move_on_after(self.config.ready_timeout) as scope:
            online = await wait_online(launched)
        if scope.cancelled_caught:
            raise DevnetError(not_online_message(launched, self.config.ready_timeout))
        for handle in handles:
            handle._came_online(online[handle.name])
            _log.info("%s online: peer %s", handle.name, handle.peer_id)
        write_topology(self.topology())

    async def _restart(self, handle: NodeHandle) -> None:
        if not self._running:
            raise DevnetError(f"cannot restart {handle.name}: the devnet is not running")
        if handle.alive:
            await handle.stop()
        await self._launch([handle], fresh_log=False)

    def _handles(self) -> list[NodeHandle]:
        return [*([self._bootstrap] if self._bootstrap else []), *self._nodes]

    async def _teardown(self) -> None:
        ours = [proc for h in self._handles() for proc in h._incarnations()]
        async with trio.open_nursery() as nursery:
            for proc in ours:
                nursery.start_soon(partial(terminate, proc, grace=self.config.stop_grace))
        # Processes devnet.json names that we did not start (`devnet restart` from a shell).
        mine = {proc.pid for proc in ours}
        try:
            recorded = read_topology(self.root)
        except DevnetError as exc:
            _log.warning("ignoring an unreadable devnet.json on teardown: %s", exc)
            recorded = None
        if recorded is not None:
            await stop_pids([(p.pid, p.data_dir) for p in recorded.processes
                             if p.pid is not None and p.pid not in mine],
                            grace=self.config.stop_grace)
        remove_topology(self.root)
        if self._plan is not None:
            await _netns.teardown(self._plan.tag)
        _log.info("devnet in %s is down", self.root)


def _default_builder(
    *,
    role: Role,
    data_dir: Path,
    listen: str,
    bootstrap: Sequence[str],
    model: Path | None,
    span: str,
    extra_args: Sequence[str],
) -> list[str]:
    return node_command(role=role, data_dir=data_dir, listen=listen, bootstrap=bootstrap,
                        model=model, span=span, extra_args=extra_args)


def _refuse_if_running(root: Path) -> None:
    recorded = read_topology(root)
    if recorded is None:
        return
    live = [p.name for p in recorded.processes if owns(p.pid, p.data_dir)]
    if live:
        raise DevnetError(
            f"a devnet is already running in {root} ({', '.join(live)}); "
            f"stop it with `shardnet devnet down --dir {root}` or use another --dir"
        )


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free TCP ports on ``host``, found by binding port 0.

    All sockets stay open until every port is chosen, so the ports are distinct; they are
    free again when the processes start (a tiny race with other programs, as with any
    choose-then-pass scheme).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()
