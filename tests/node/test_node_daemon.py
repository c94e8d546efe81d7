"""The daemon as real processes: graceful shutdown, restart with the same identity, no orphans."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from devnet import Devnet
from node._client import Client, ClientConfig


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


async def test_drain_restart_and_no_orphans(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "net"
    with trio.fail_after(120):
        async with Devnet(2, root=root, model=tiny_model, spans=["0:3", "3:6"]) as net:
            node = net.nodes[1]
            peer_id = node.peer_id
            # A generation through both nodes works.
            async with Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                              config=ClientConfig(route_timeout_s=30)) as client:
                assert await client.generate_text("The list type", max_new_tokens=8)
            # SIGTERM: the node drains and exits cleanly, well within 5 s.
            started = time.monotonic()
            assert await node.stop() == 0  # SIGTERM; SIGKILL would only come after 8 s
            assert time.monotonic() - started < 5
            status = node.status()
            assert status is not None and status.state == "stopped"
            # Same data dir, same identity.
            await node.restart()
            assert node.peer_id == peer_id
            async with Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                              config=ClientConfig(route_timeout_s=30)) as client:
                assert await client.generate_text("The list type", max_new_tokens=8)
    assert _processes_mentioning(str(root)) == []
