"""A handle on one process of a running devnet: the scenarios (kill, freeze, cut off, ...).

A handle owns the :class:`trio.Process` objects of every incarnation of its process (a
restart adds one) so that the devnet can stop and reap all of them on exit. Readiness and
restarts belong to the devnet, which the handle calls back through ``restarter``.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from devnet import _netns
from devnet._errors import DevnetError
from devnet._procs import STOP_GRACE, Launched, owns, release, terminate
from devnet._status import NodeStatus, Role, read_status
from devnet._topology import ProcessRecord


class NodeHandle:
    """One process of a running devnet (a serving node or the bootstrap), for scenarios.

    Signals go to the process we started; ``ip netns exec`` execs the node, so in ``--netns``
    mode too the pid is the node's own. Methods that need a live process raise
    :class:`DevnetError` rather than silently doing nothing, so a scenario that kills a node
    twice finds out.
    """

    def __init__(
        self,
        *,
        name: str,
        index: int | None,
        role: Role,
        data_dir: Path,
        log_path: Path,
        listen: str,
        command: Sequence[str],
        netns: str | None = None,
        veth: str | None = None,
        stop_grace: float = STOP_GRACE,
        restarter: Callable[[NodeHandle], Awaitable[None]],
    ) -> None:
        self._stop_grace = stop_grace
        self._restarter = restarter
        self.name = name
        self.index = index
        self.role: Role = role
        self.data_dir = data_dir
        self.log_path = log_path
        self.listen = listen
        self.command: tuple[str, ...] = tuple(command)
        self.netns = netns
        self.veth = veth
        self._processes: list[trio.Process] = []  # every incarnation, reaped on exit
        self._pid: int | None = None  # the current one's pid, kept after a detach
        self._online: NodeStatus | None = None  # the current process's status once online

    def __repr__(self) -> str:
        return f"<NodeHandle {self.name} pid={self._pid} alive={self.alive}>"

    @property
    def _process(self) -> trio.Process:
        if not self._processes:
            if self._pid is not None:
                raise DevnetError(f"{self.name} was detached; act on it through devnet.json "
                                  "(shardnet devnet ...)")
            raise DevnetError(f"{self.name} has not been started")
        return self._processes[-1]

    @property
    def pid(self) -> int:
        """The pid of the current process."""
        if self._pid is None:
            raise DevnetError(f"{self.name} has not been started")
        return self._pid

    @property
    def alive(self) -> bool:
        """Whether the current process has not exited (a frozen one is alive)."""
        if self._processes:
            return self._processes[-1].returncode is None
        return owns(self._pid, self.data_dir)  # detached (or never started: False)

    @property
    def returncode(self) -> int | None:
        """The current process's exit status (negative: killed by that signal), or ``None``."""
        return self._process.returncode

    @property
    def peer_id(self) -> str:
        """The peer id the process reported when it came online."""
        return self._online_status().peer_id

    @property
    def addrs(self) -> tuple[str, ...]:
        """The full multiaddrs the process reported when it came online."""
        return self._online_status().addrs

    def _online_status(self) -> NodeStatus:
        if self._online is None:
            raise DevnetError(f"{self.name} has not come online")
        return self._online

    def status(self) -> NodeStatus | None:
        """Its ``status.json`` now (check ``.pid`` against :attr:`pid`: it may be stale)."""
        return read_status(self.data_dir)

    def _launched(self) -> Launched:
        return Launched(name=self.name, role=self.role, data_dir=self.data_dir,
                        log=self.log_path, process=self._process)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._process
        if proc.returncode is not None:
            raise DevnetError(f"{self.name} is not running (exit status {proc.returncode})")
        proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without draining (a crash, a pulled plug)."""
        self._signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the node hangs with its sockets open (a laptop asleep, a GC pause)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: wake a frozen node."""
        self._signal(signal.SIGCONT)

    async def cut_off(self) -> None:
        """Take its link down: the node runs on, but its packets go nowhere (netns mode only).

        Async because it runs ``ip``, which must not block the event loop.

        Raises:
            DevnetError: the devnet is not in ``--netns`` mode, or ``ip`` failed.
        """
        await _netns.set_link(self._veth(), up=False)

    async def reconnect(self) -> None:
        """Bring its link back up after :meth:`cut_off` (netns mode only).

        Raises:
            DevnetError: the devnet is not in ``--netns`` mode, or ``ip`` failed.
        """
        await _netns.set_link(self._veth(), up=True)

    def _veth(self) -> str:
        if self.veth is None:
            raise DevnetError(
                f"cut_off/reconnect of {self.name} need a devnet started with netns=True "
                "(--netns): only then does each node have a link of its own"
            )
        return self.veth

    async def wait(self) -> int:
        """Wait until the current process exits; return its exit status."""
        return await self._process.wait()

    async def stop(self) -> int:
        """SIGTERM (the node drains), SIGKILL after the devnet's grace period; wait for it.

        Returns:
            Its exit status (0 for a clean drain).
        """
        return await terminate(self._process, grace=self._stop_grace)

    async def restart(self) -> None:
        """Stop it if it runs, start it again with the same data dir and args, wait online.

        The same data dir keeps the same identity, so the peer id is unchanged.

        Raises:
            DevnetError: the devnet is not running, or the node did not come back online.
        """
        await self._restarter(self)

    def record(self) -> ProcessRecord:
        """This process as ``devnet.json`` records it."""
        online = self._online
        return ProcessRecord(
            name=self.name, index=self.index, role=self.role, pid=self._pid,
            peer_id=online.peer_id if online else None, addrs=online.addrs if online else (),
            listen=self.listen, data_dir=self.data_dir, log=self.log_path,
            command=self.command, netns=self.netns, veth=self.veth,
        )

    # The devnet that owns this handle drives its lifecycle through these.

    def _started(self, proc: trio.Process) -> None:
        self._processes.append(proc)
        self._pid = proc.pid
        self._online = None

    def _came_online(self, status: NodeStatus) -> None:
        self._online = status

    def _incarnations(self) -> list[trio.Process]:
        return list(self._processes)

    def _release(self) -> None:
        release(self._processes)
