"""Process lifecycle: spawn with a log file, wait until online, stop; by handle or by pid.

Theory of operation: a process is started with stdout and stderr appended to its log file and
stdin closed. It is ready when its ``status.json`` says "online" *and* names the pid we started
(the file of a previous run says "online" too). If it exits first, the error quotes the tail of
its log, which is where the reason is.

The stop policy is the same everywhere. Send SIGTERM (the node drains and
exits 0 by contract), then SIGCONT so that a frozen (SIGSTOPped) process wakes up to handle it
instead of costing the whole grace period; after ``grace`` seconds, SIGCONT and SIGKILL the
stragglers and reap them.

A child we spawned is a :class:`trio.Process`: we wait on it and reap it. A process of a
detached devnet is not our child (its launcher exited), so we can only poll it; and its pid may
have been reused since ``devnet.json`` was written, so before signalling we check on ``/proc``
that the pid still runs a command naming its data dir. A zombie counts as gone: its parent
(init) reaps it, not us.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from devnet._errors import DevnetError, StatusFileError
from devnet._status import STATUS_FILE, NodeStatus, Role, read_status

#: Seconds a process gets between SIGTERM and SIGKILL (the contract promises ~5 s).
STOP_GRACE = 8.0
_POLL = 0.05
_PROC = Path("/proc")


def _open_log(path: Path, *, fresh: bool, note: str) -> BinaryIO:
    # Sync on purpose: opening a local file is instant, and Popen needs a real fd.
    log = path.open("wb" if fresh else "ab")
    if note:
        log.write(note.encode())
        log.flush()
    return log


async def spawn(
    argv: Sequence[str], *, name: str, log: Path, fresh_log: bool, new_session: bool
) -> trio.Process:
    """Start one devnet process, its stdout and stderr going to ``log``.

    Args:
        argv: the full command.
        name: "bootstrap" or "node-N", for messages.
        log: the log file; truncated when ``fresh_log``, else appended to after a marker line.
        new_session: start it in its own session (``setsid``), so it survives the launcher
            and a Ctrl-C in the launcher's terminal (detached devnets).

    Raises:
        DevnetError: the program cannot be started at all.
    """
    note = "" if fresh_log else f"--- devnet: restarting {name} ---\n"
    with _open_log(log, fresh=fresh_log, note=note) as out:
        try:
            return await trio.lowlevel.open_process(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )
        except OSError as exc:
            raise DevnetError(f"cannot start {name} ({argv[0]}): {exc}") from exc


@dataclass(frozen=True, slots=True)
class Launched:
    """A process we started and wait on to come online."""

    name: str
    role: Role
    data_dir: Path
    log: Path
    process: trio.Process


def check_online(launched: Launched) -> NodeStatus | None:
    """The process's status if it is online now, ``None`` if not yet.

    Raises:
        DevnetError: it exited (quoting its log's tail).
        StatusFileError: its status file breaks the contract.
    """
    proc = launched.process
    if proc.returncode is not None:
        raise DevnetError(
            f"{launched.name} (pid {proc.pid}) exited with code {proc.returncode} before it "
            f"came online; last lines of {launched.log}:\n{log_tail(launched.log)}"
        )
    status = read_status(launched.data_dir)
    if status is None or status.pid != proc.pid or not status.online:
        return None
    if status.role != launched.role:
        raise StatusFileError(
            f"{launched.data_dir / STATUS_FILE}: role {status.role!r}, expected {launched.role!r}"
        )
    return status


async def wait_online(launched: Sequence[Launched]) -> dict[str, NodeStatus]:
    """Poll until every process is online; return their statuses by name.

    Polling is the contract: a node announces readiness only through its status file. Bound
    the wait at the call site and explain a timeout with :func:`not_online_message`.

    Raises:
        DevnetError: one exited first (quoting its log's tail).
    """
    pending = list(launched)
    online: dict[str, NodeStatus] = {}
    while True:
        for item in list(pending):
            status = check_online(item)
            if status is not None:
                online[item.name] = status
                pending.remove(item)
        if not pending:
            return online
        await trio.sleep(_POLL)


def not_online_message(launched: Sequence[Launched], timeout: float) -> str:
    """Why a :func:`wait_online` that timed out was waiting: each laggard's last state."""
    parts = []
    laggards = []
    for item in launched:
        try:
            status = read_status(item.data_dir)
        except StatusFileError as exc:
            parts.append(f"{item.name} ({exc})")
            laggards.append(item)
            continue
        if status is None or status.pid != item.process.pid:
            parts.append(f"{item.name} (no status from this process yet)")
        elif not status.online:
            parts.append(f"{item.name} (state {status.state})")
        else:
            continue
        laggards.append(item)
    first = laggards[0] if laggards else launched[0]
    return (
        f"not online after {timeout:g} s: {', '.join(parts) or 'all online at the last check'};"
        f" last lines of {first.log}:\n{log_tail(first.log)}"
    )


async def terminate(proc: trio.Process, *, grace: float = STOP_GRACE) -> int:
    """Stop a child: SIGTERM + SIGCONT, then SIGKILL after ``grace`` seconds; reap it.

    Returns:
        Its exit status (negative: the signal that ended it).
    """
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    return await proc.wait()


def release(processes: list[trio.Process]) -> None:
    """Forget running children on purpose: a detached devnet's processes outlive us by design.

    Dropping a running child makes Python warn that the "subprocess is still running" and
    that its pidfd is unclosed. Here that is the intent, so the warning is silenced for this
    drop only. They stay children of this process: a CLI exits right away and init reaps
    them; a long-lived program has them reaped by ``subprocess`` when it next starts one.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        processes.clear()
        gc.collect()


def cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from ``/proc``, or ``None`` if it is gone or a zombie."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # zombies and kernel threads have no cmdline
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` ("R", "S", "T" for stopped, "Z", ...), or ``None``."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ..." -- comm may hold spaces and parentheses, so split at the last ")".
    return stat.rpartition(")")[2].split()[0]


def owns(pid: int | None, data_dir: Path) -> bool:
    """Whether ``pid`` is alive and still the devnet process of ``data_dir``.

    Guards every signal sent by pid: after a reboot or a long time the pid may belong to an
    unrelated program. Without ``/proc`` (not Linux) the pid is trusted if it exists.
    """
    if pid is None or pid <= 0:
        return False
    if not _PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    argv = cmdline(pid)
    return argv is not None and str(data_dir) in argv and proc_state(pid) != "Z"


def signal_pid(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid``; ``False`` when it is already gone.

    Raises:
        DevnetError: not allowed (a ``--netns`` devnet runs as root; so must its ``down``).
    """
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise DevnetError(f"not allowed to signal pid {pid} ({exc}); was it started "
                          "with sudo?") from exc
    return True


async def stop_pids(targets: Sequence[tuple[int, Path]], *, grace: float = STOP_GRACE) -> None:
    """Stop processes that are not our children, by pid, with the usual policy.

    Args:
        targets: ``(pid, data_dir)`` pairs; a pid that no longer runs its data dir is skipped.
        grace: seconds between SIGTERM and SIGKILL.
    """
    live = [(pid, d) for pid, d in targets if owns(pid, d)]
    for pid, _ in live:
        signal_pid(pid, signal.SIGTERM)
        signal_pid(pid, signal.SIGCONT)
    with trio.move_on_after(grace):
        live = await _until_gone(live)
    live = [(pid, d) for pid, d in live if owns(pid, d)]
    for pid, _ in live:
        signal_pid(pid, signal.SIGCONT)
        signal_pid(pid, signal.SIGKILL)
    await _until_gone(live)  # SIGKILL cannot be ignored: the kernel finishes the job


async def _until_gone(targets: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    # Polling, because a process that is not our child gives no exit notification we can
    # wait on portably (pidfd would, on Linux only).
    while True:
        targets = [(pid, d) for pid, d in targets if owns(pid, d)]
        if not targets:
            return targets
        await trio.sleep(_POLL)


def log_tail(path: Path, *, lines: int = 20, limit: int = 4000) -> str:
    """The last ``lines`` lines of a log (at most ``limit`` characters), for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(the log is empty)"
