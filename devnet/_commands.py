"""The argv of a node process: the one place the devnet spells the node CLI.

The process launcher, the ``devnet`` CLI and ``docker-compose.yml`` must start nodes with the
same commands, so all of them go through :func:`node_command` (the compose file is checked
against it by a test). Tests swap the program (``python -m node``) for a stub script through
the ``program`` argument or a whole :class:`CommandBuilder`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from devnet._errors import DevnetError
from devnet._status import Role

#: What starts a node process by default: the ``node`` package's ``__main__``.
NODE_PROGRAM: tuple[str, ...] = (sys.executable, "-m", "node")

_SPAN = re.compile(r"(\d+):(\d+)")


class CommandBuilder(Protocol):
    """Builds the argv of one devnet process (see :func:`node_command` for the arguments)."""

    def __call__(
        self,
        *,
        role: Role,
        data_dir: Path,
        listen: str,
        bootstrap: Sequence[str],
        model: Path | None,
        span: str,
        extra_args: Sequence[str],
    ) -> list[str]: ...


def check_span(span: str) -> str:
    """Return ``span`` if it is "auto" or "a:b" with ``0 <= a < b``.

    Raises:
        DevnetError: anything else, before a process is started with it.
    """
    match = _SPAN.fullmatch(span)
    if span == "auto" or (match and int(match[1]) < int(match[2])):
        return span
    raise DevnetError(f"span must be 'auto' or 'start:end' with start < end, got {span!r}")


def listen_multiaddr(host: str, port: int) -> str:
    """The ``--listen`` multiaddr for an IPv4 host and TCP port."""
    return f"/ip4/{host}/tcp/{port}"


def node_command(
    *,
    role: Role,
    data_dir: Path,
    listen: str,
    bootstrap: Sequence[str] = (),
    model: Path | None = None,
    span: str = "auto",
    extra_args: Sequence[str] = (),
    program: Sequence[str] = NODE_PROGRAM,
) -> list[str]:
    """The argv that starts one devnet process, as the process contract spells it.

    Args:
        role: "bootstrap" (``node bootstrap``) or "node" (``node run``).
        data_dir: the process's data dir (identity, ``status.json``).
        listen: the listen multiaddr, ``/ip4/HOST/tcp/PORT``.
        bootstrap: bootstrap multiaddrs, one ``--bootstrap`` each (serving nodes only).
        model: a checkpoint folder; ``None`` means the node's embedded model.
        span: "auto" or "a:b" (serving nodes only).
        extra_args: passed through verbatim to serving nodes (e.g. ``--link-delay-ms 50``).
        program: what to run instead of ``python -m node`` (a stub in tests, a venv's python).
    """
    if role == "bootstrap":
        return [*program, "bootstrap", "--data-dir", str(data_dir), "--listen", listen,
                "--no-mdns"]
    argv = [*program, "run", "--data-dir", str(data_dir), "--listen", listen]
    for addr in bootstrap:
        argv += ["--bootstrap", addr]
    if model is not None:
        argv += ["--model", str(model)]
    argv += ["--span", check_span(span), "--threads", "1", "--no-mdns", *extra_args]
    return argv
