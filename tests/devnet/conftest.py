"""Fixtures for the devnet tests: the stub node, a run directory that must end up clean.

Every test gets its own run directory under ``tmp_path``; afterwards no process whose command
line names that directory may be left, nor a namespace or link with the directory's netns
tag. The fixture kills any leftover (they are this test's own) and then fails the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from devnet import NetnsPlan, Role, node_command
from devnet._leaks import leftover_processes, unreaped_children

STUB = Path(__file__).with_name("stub_node.py")
STUB_PROGRAM = (sys.executable, str(STUB))
NETNS_OK = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None

Builder = Callable[..., list[str]]


def stub_builder(per_node: dict[str, Sequence[str]] | None = None,
                 all_nodes: Sequence[str] = ()) -> Builder:
    """A node_command that starts the stub; ``per_node`` adds args by data dir name."""
    extra = per_node or {}

    def build(*, role: Role, data_dir: Path, listen: str, bootstrap: Sequence[str],
              model: Path | None, span: str, extra_args: Sequence[str]) -> list[str]:
        argv = node_command(role=role, data_dir=data_dir, listen=listen, bootstrap=bootstrap,
                            model=model, span=span, extra_args=extra_args,
                            program=STUB_PROGRAM)
        more = list(extra.get(data_dir.name, ()))
        if role == "node":
            more += list(all_nodes)
        return argv + more

    return build


def leftover_netns(root: Path) -> list[str]:
    """Namespaces and links carrying ``root``'s netns tag."""
    tag = NetnsPlan.tag_for(root)
    found = []
    if Path("/run/netns").is_dir():
        found += [p.name for p in Path("/run/netns").iterdir()
                  if p.name.startswith(f"shardnet-{tag}-")]
    found += [p.name for p in Path("/sys/class/net").iterdir()
              if p.name.startswith((f"snb{tag}", f"snv{tag}"))]
    return found


def assert_clean(root: Path, needle: Path | None = None) -> None:
    """Nothing of the devnet in ``root`` is left: processes, zombies, namespaces."""
    assert leftover_processes(needle or root) == []
    assert unreaped_children() == []
    assert leftover_netns(root) == []


async def until(predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``predicate`` (sync or async) until it holds; fail after 30 s.

    Generous on purpose: the machine is shared. A passing run waits milliseconds.
    """
    with trio.fail_after(30):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.02)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh run directory; fails the test if anything of the devnet is left afterwards."""
    root = tmp_path / "run"
    yield root
    procs = leftover_processes(tmp_path)
    for line in procs:
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    netns = leftover_netns(root)
    for name in netns:  # best effort, so one failure does not poison the next tests
        what = ["netns", "del"] if name.startswith("shardnet-") else ["link", "del"]
        subprocess.run(["ip", *what, name], capture_output=True, check=False)
    assert not procs and not netns, f"left behind: {procs + netns}"


class Helpers:
    """The module's helpers, for tests (``--import-mode=importlib`` cannot import conftest)."""

    stub = staticmethod(stub_builder)
    assert_clean = staticmethod(assert_clean)
    until = staticmethod(until)
    leftover_processes = staticmethod(leftover_processes)
    leftover_netns = staticmethod(leftover_netns)
    stub_program = STUB_PROGRAM
    netns_ok = NETNS_OK


@pytest.fixture
def h() -> type[Helpers]:
    """The helpers: ``h.stub(...)``, ``h.until(...)``, ``h.assert_clean(root)``, ..."""
    return Helpers
