"""A loopback swarm in one trio run: a bootstrap and one node per span."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from node._daemon import NodeConfig, RunningNode, run_node
from p2p import Identity

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@dataclass
class Swarm:
    bootstrap: str
    nodes: list[RunningNode]
    scopes: list[trio.CancelScope]

    def stop(self, index: int) -> None:
        """End node `index` abruptly (its streams are reset, as when a process dies)."""
        self.scopes[index].cancel()

    def index_of(self, peer_id: str) -> int:
        return [str(n.host.peer_id) for n in self.nodes].index(peer_id)


SwarmFactory = Callable[..., AbstractAsyncContextManager[Swarm]]


@pytest.fixture
def loopback_swarm(tmp_path: Path) -> SwarmFactory:
    @asynccontextmanager
    async def make(model: Path, spans: list[str], **node_kw: Any) -> AsyncIterator[Swarm]:
        async with trio.open_nursery() as nursery:
            boot: RunningNode = await nursery.start(lambda task_status: run_node(
                NodeConfig(data_dir=tmp_path / "boot", listen=LOOPBACK, mdns=False),
                role="bootstrap", task_status=task_status))
            addr = boot.host.listen_addrs()[0]
            nodes, scopes = [], []
            for i, span in enumerate(spans):
                config = NodeConfig(data_dir=tmp_path / f"n{i}", model=model, span=span,
                                    listen=LOOPBACK, bootstrap=(addr,), mdns=False, jitter_s=0,
                                    swarm_settle_s=0, announce_interval_s=0.5, **node_kw)
                scope = trio.CancelScope()

                async def run(c: NodeConfig = config, s: trio.CancelScope = scope, *,
                              task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    with s:
                        await run_node(c, task_status=task_status)

                nodes.append(await nursery.start(run))
                scopes.append(scope)
            yield Swarm(addr, nodes, scopes)
            nursery.cancel_scope.cancel()

    return make


@pytest.fixture
def dead_bootstrap() -> str:
    """A bootstrap address nobody answers at: a loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
