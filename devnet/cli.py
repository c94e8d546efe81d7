"""``shardnet devnet ...``: start, inspect, disturb and stop a local devnet from a shell.

``up`` runs a :class:`~devnet.Devnet` in the foreground until Ctrl-C (or until ``down`` from
another terminal removes its ``devnet.json``), or with ``--detach`` starts the processes in
their own sessions and returns. Every other subcommand acts through ``DIR/devnet.json``, so it
works the same on a foreground and on a detached devnet. ``main`` runs these subcommands on
their own (``python -m devnet.cli up ...``); the ``shardnet`` CLI mounts them with
:func:`add_devnet_parser`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from devnet import _netns
from devnet._commands import NODE_PROGRAM, node_command
from devnet._errors import DevnetError
from devnet._launcher import Devnet
from devnet._procs import (
    STOP_GRACE,
    Launched,
    not_online_message,
    owns,
    proc_state,
    signal_pid,
    spawn,
    stop_pids,
    wait_online,
)
from devnet._status import Role, read_status
from devnet._topology import (
    TOPOLOGY_FILE,
    ProcessRecord,
    Topology,
    read_topology,
    remove_topology,
    write_topology,
)
from node._errors import sole_error
from node._node_cli import non_negative
from sharding import ShardingError

DEFAULT_DIR = Path(tempfile.gettempdir()) / "shardnet-devnet"
_WATCH_INTERVAL = 0.5


def add_devnet_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``devnet`` and its subcommands to the ``shardnet`` CLI.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned. Each subcommand sets
            ``func`` to a callable taking the parsed namespace and returning an exit status.

    Returns:
        The ``devnet`` parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "devnet", help="run a local network of nodes (processes or network namespaces)",
        description="A bootstrap and N nodes on this machine, for development and fault drills.",
    )
    _add_commands(parser)
    return parser


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="devnet_command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], helptext: str
                ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                       help=f"the devnet's run directory (default {DEFAULT_DIR})")
        p.set_defaults(func=func)
        return p

    up = command("up", _up, "start a bootstrap and N nodes")
    up.add_argument("--nodes", type=int, default=3, help="serving nodes (default 3)")
    up.add_argument("--model", type=Path, help="checkpoint folder (default: embedded model)")
    up.add_argument("--span", action="append", default=[], dest="spans",
                    help="'auto' or 'a:b', once per node (default: all auto)")
    up.add_argument("--netns", action="store_true",
                    help="one network namespace and address per process (root, Linux)")
    up.add_argument("--detach", action="store_true",
                    help="leave the devnet running in the background and return")
    up.add_argument("--program", default=shlex.join(NODE_PROGRAM),
                    help="what starts a node process, split like a shell (default: %(default)s)")
    up.add_argument("--node-arg", action="append", default=[], dest="node_args",
                    metavar="ARG", help="pass ARG to every node (--node-arg=--grace=5)")
    up.add_argument("--link-delay-ms", type=non_negative, metavar="MS",
                    help="WAN emulation: every node delays each message it sends by MS")
    up.add_argument("--link-bandwidth-mbps", type=non_negative, metavar="MBPS",
                    help="WAN emulation: every node sends at most MBPS megabits/s per link")
    up.add_argument("--ready-timeout", type=float, default=120.0,
                    help="seconds to wait for all nodes to come online (default 120)")
    command("down", _down, "stop a devnet and remove its namespaces")
    command("status", _status, "show each process's pid, state, span and peer id")
    scenarios = {
        "kill": "SIGKILL a node (a crash)",
        "freeze": "SIGSTOP a node (a hang)",
        "thaw": "SIGCONT a frozen node",
        "cut-off": "take a node's link down (--netns only)",
        "reconnect": "bring a node's link back up (--netns only)",
        "restart": "stop a node if it runs, start it again, wait until online",
    }
    for name, helptext in scenarios.items():
        p = command(name, _scenario, helptext)
        p.add_argument("node", type=_node_index, help="node index, or 'bootstrap'")
        if name == "restart":
            p.add_argument("--ready-timeout", type=float, default=120.0,
                           help="seconds to wait for it to come online (default 120)")


def node_args(args: argparse.Namespace) -> list[str]:
    """The extra argv every serving node of ``devnet up`` gets: shaping flags, --node-arg."""
    extra: list[str] = []
    if args.link_delay_ms is not None:
        extra += ["--link-delay-ms", f"{args.link_delay_ms:g}"]
    if args.link_bandwidth_mbps is not None:
        extra += ["--link-bandwidth-mbps", f"{args.link_bandwidth_mbps:g}"]
    return extra + list(args.node_args)


def _node_index(text: str) -> int | None:
    if text in ("bootstrap", "b"):
        return None
    try:
        index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a node index: {text!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"node indexes start at 0, got {index}")
    return index


def _error(exc: BaseException) -> int:
    print(f"devnet: error: {exc}", file=sys.stderr)
    return 1


# A devnet's, a model folder's or a --dir's error: reported in a line.
_EXPECTED = (DevnetError, ShardingError, OSError)


def _run(async_fn: Callable[[], Any]) -> int:
    try:
        return int(trio.run(async_fn))
    except (*_EXPECTED, ExceptionGroup) as exc:  # maybe in a group of one
        cause = sole_error(exc)
        if not isinstance(cause, _EXPECTED):
            raise
        return _error(cause)


# --- up ------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="devnet: %(message)s")
    program = shlex.split(args.program)
    if not program:
        print("devnet: error: --program is empty", file=sys.stderr)
        return 2

    def build(*, role: Role, data_dir: Path, listen: str, bootstrap: Sequence[str],
              model: Path | None, span: str, extra_args: Sequence[str]) -> list[str]:
        return node_command(role=role, data_dir=data_dir, listen=listen, bootstrap=bootstrap,
                            model=model, span=span, extra_args=extra_args, program=program)

    async def serve() -> None:
        net = Devnet(
            args.nodes, root=args.dir, model=args.model, spans=args.spans or None,
            netns=args.netns, extra_args=node_args(args), node_command=build,
            ready_timeout=args.ready_timeout, detach=args.detach,
        )
        async with net:
            _print_topology(net.topology())
            if args.detach:
                print(f"detached; stop it with: shardnet devnet down --dir {net.root}")
                return
            print("running; Ctrl-C (or `shardnet devnet down`) stops it", flush=True)
            await _until_taken_down(net.root)
            print("devnet down from elsewhere: stopping what is left", flush=True)

    async def main() -> int:
        # Signals become cancellation of the whole command, whether it is still starting
        # (a slow model load) or serving; the Devnet's exit then stops every process.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                try:
                    await serve()
                except DevnetError as exc:
                    return _error(exc)
                finally:
                    nursery.cancel_scope.cancel()
        return 0

    return _run(main)


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for signum in signals:
        print(f"{signal.Signals(signum).name}: stopping the devnet", flush=True)
        scope.cancel()
        return


async def _until_taken_down(root: Path) -> None:
    """Return once ``devnet.json`` is gone: ``shardnet devnet down`` ran elsewhere."""
    while True:  # polling: a file's removal has no portable notification
        if not (root / TOPOLOGY_FILE).exists():
            return
        await trio.sleep(_WATCH_INTERVAL)


# --- down, status ----------------------------------------------------------------------------


def _load(root: Path) -> Topology:
    topology = read_topology(root.resolve())
    if topology is None:
        raise DevnetError(f"no devnet in {root} (no {TOPOLOGY_FILE}); start one with `up`")
    return topology


def _down(args: argparse.Namespace) -> int:
    async def main() -> int:
        topology = _load(args.dir)
        if topology.netns_tag is not None:
            _netns.check_support()  # before stopping anything: all or nothing
        live = [p for p in topology.processes if owns(p.pid, p.data_dir)]
        await stop_pids([(p.pid, p.data_dir) for p in live if p.pid is not None],
                        grace=STOP_GRACE)
        for p in live:
            print(f"{p.name:<10} pid {p.pid} stopped")
        if topology.netns_tag is not None:
            await _netns.teardown(topology.netns_tag)
            print(f"removed namespaces shardnet-{topology.netns_tag}-*")
        remove_topology(topology.root)
        print(f"devnet in {topology.root} is down")
        return 0

    return _run(main)


def _status(args: argparse.Namespace) -> int:
    try:
        _print_topology(_load(args.dir))
    except DevnetError as exc:
        return _error(exc)
    return 0


def _describe(p: ProcessRecord) -> str:
    """One line per process: name, pid, state(s), span, address."""
    status = read_status(p.data_dir)
    current = status if status is not None and status.pid == p.pid else None
    if not owns(p.pid, p.data_dir):
        states = ["dead"]
    else:
        states = [current.state if current else "starting"]
        if proc_state(p.pid or 0) == "T":
            states.append("frozen")
        if p.veth is not None and not _netns.link_is_up(p.veth):
            states.append("cut-off")
    span = f"span {status.span[0]}:{status.span[1]}" if status and status.span else ""
    if status is not None and status.rebalances:
        span += f" (moved {status.rebalances}x)"
    addr = p.addrs[0] if p.addrs else p.listen
    pid = "-" if p.pid is None else str(p.pid)
    return f"{p.name:<10} pid {pid:<8} {','.join(states):<16} {span:<10} {addr}"


def _print_topology(topology: Topology) -> None:
    mode = "detached" if topology.detached else f"launcher pid {topology.launcher_pid}"
    netns = f", netns shardnet-{topology.netns_tag}-*" if topology.netns_tag else ""
    print(f"devnet in {topology.root} ({len(topology.nodes)} nodes, {mode}{netns})")
    for p in topology.processes:
        print(_describe(p))


# --- scenarios -------------------------------------------------------------------------------


def _scenario(args: argparse.Namespace) -> int:
    async def main() -> int:
        topology = _load(args.dir)
        record = topology.find(args.node)
        action = args.devnet_command
        if action == "restart":
            await _restart(topology, record, ready_timeout=args.ready_timeout)
            return 0
        if action in ("cut-off", "reconnect"):
            if record.veth is None:
                raise DevnetError(f"cannot {action} {record.name}: the devnet is not --netns")
            await _netns.set_link(record.veth, up=action == "reconnect")
            print(f"{record.name:<10} {'cut off' if action == 'cut-off' else 'reconnected'}")
            return 0
        if record.pid is None or not owns(record.pid, record.data_dir):
            raise DevnetError(f"{record.name} is not running")
        sig = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "thaw": signal.SIGCONT}[action]
        signal_pid(record.pid, sig)
        print(f"{record.name:<10} pid {record.pid} {sig.name}")
        return 0

    return _run(main)


async def _restart(topology: Topology, record: ProcessRecord, *, ready_timeout: float) -> None:
    """Relaunch a node's recorded command in its own session; wait until it is online."""
    if record.pid is not None and owns(record.pid, record.data_dir):
        await stop_pids([(record.pid, record.data_dir)], grace=STOP_GRACE)
    proc = await spawn(record.command, name=record.name, log=record.log, fresh_log=False,
                       new_session=True)
    launched = Launched(name=record.name, role=record.role, data_dir=record.data_dir,
                        log=record.log, process=proc)
    restarted = replace(record, pid=proc.pid)
    write_topology(topology.with_record(restarted))  # so `down` finds it even if we fail
    with trio.move_on_after(ready_timeout) as scope:
        status = (await wait_online([launched]))[record.name]
    if scope.cancelled_caught:
        raise DevnetError(not_online_message([launched], ready_timeout))
    restarted = replace(restarted, peer_id=status.peer_id, addrs=status.addrs)
    write_topology(topology.with_record(restarted))
    print(f"{record.name:<10} pid {proc.pid} online again, peer {status.peer_id}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a devnet subcommand: ``python -m devnet.cli up --nodes 3``."""
    parser = argparse.ArgumentParser(prog="shardnet devnet", description=__doc__)
    _add_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
