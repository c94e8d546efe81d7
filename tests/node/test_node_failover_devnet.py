"""Failover with real processes: a node killed mid-generation changes nothing."""

from __future__ import annotations

from pathlib import Path

import trio

from devnet import Devnet
from node._client import Client, ClientConfig
from node._sampling import SamplingParams
from node._textgen import LocalModel

PROMPT = "The list type"


async def test_a_middle_node_killed_mid_generation_changes_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=64)
    expected = "".join([p async for p in LocalModel(tiny_model).generate(PROMPT, params)])
    # Stages: 0 embed, 1-4 blocks, 5 head. Two nodes can serve the middle: spare capacity.
    spans = ["0:2", "2:4", "2:4", "4:6"]
    config = ClientConfig(codec="raw", route_timeout_s=30, dead_after_s=1.0)
    with trio.fail_after(120):
        async with Devnet(4, root=tmp_path / "net", model=tiny_model, spans=spans) as net, \
                Client(bootstrap=net.bootstrap_addrs, model=tiny_model, config=config) as client:
            pieces: list[str] = []
            victim = None
            async for piece in client.generate(PROMPT, max_new_tokens=64):
                pieces.append(piece)
                if len(pieces) == 24 and victim is None:
                    route = client.last.route
                    assert route is not None
                    middle = next(h for h in route.hops if h.start == 2)
                    victim = next(n for n in net.nodes if n.peer_id == middle.peer_id)
                    victim.kill()  # SIGKILL, mid-sentence
            info = client.last
    assert "".join(pieces) == expected
    assert info.failovers == 1
