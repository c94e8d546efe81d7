"""Concurrency with real processes: 8 clients at once get what each would get alone.

Eight `Client`s, each with its own host and its own prompt, generate greedily through a
3-node devnet at the same time. To make sure they really overlap (and do not just happen to
run one after another on a slow machine), every client waits after its first token until all
eight have one: at that moment all eight pipelines, 24 server sessions, are open, and the
remaining tokens are decoded concurrently.

Token ids are compared, not text: the tiny random model emits bytes that are not UTF-8, which
the text path would fold into U+FFFD and so hide a difference.

* `raw` activations: the network computes exactly what the single-process path does, so each
  concurrent output must equal the local reference.
* `int8-block` activations are quantized between peers and may differ from the local run, so
  the concurrent outputs are compared with the same prompts generated one by one on the
  network.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import trio

from devnet import Devnet
from node._client import Client, ClientConfig
from node._generate import generate_ids
from node._local import LocalStages
from node._sampling import Sampler, SamplingParams
from node._textgen import LocalModel

PROMPTS = ("The list type", "def ", "Hello, world", "import trio", "In the beginning",
           "0123", "class Foo:", "for i in range")
TOKENS = 32
SPANS = ["0:2", "2:4", "4:6"]  # stages: 0 embed, 1-4 blocks, 5 head


class Barrier:
    """Wait until `parties` tasks have arrived (trio has no barrier of its own)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self._all_here = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self._all_here.set()
        await self._all_here.wait()


def _config(codec: str) -> ClientConfig:
    return ClientConfig(codec=codec, route_timeout_s=30)


async def _local_reference(model: Path) -> list[list[int]]:
    local = LocalModel(model)
    out = []
    for prompt in PROMPTS:
        ids = local.tokenizer.encode(prompt)
        stages = LocalStages(local.span, max_length=len(ids) + TOKENS)
        params = SamplingParams(temperature=0, max_new_tokens=TOKENS)
        async with aclosing(generate_ids(stages.forward, ids, Sampler(params),
                                         eos_id=local.eos_id)) as tokens:
            out.append([t async for t in tokens])
    return out


async def _one_by_one(net: Devnet, model: Path, codec: str) -> list[list[int]]:
    async with Client(bootstrap=net.bootstrap_addrs, model=model,
                      config=_config(codec)) as client:
        out = []
        for prompt in PROMPTS:
            ids = client.tokenizer.encode(prompt)
            async with aclosing(client.generate_ids(ids, max_new_tokens=TOKENS)) as tokens:
                out.append([t async for t in tokens])
        return out


async def _concurrently(net: Devnet, model: Path, codec: str) -> list[list[int]]:
    """Each prompt on its own client, all at once; returns outputs in prompt order."""
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    first_token = Barrier(len(PROMPTS))

    async def one(index: int, prompt: str) -> None:
        async with Client(bootstrap=net.bootstrap_addrs, model=model,
                          config=_config(codec)) as client:
            ids = client.tokenizer.encode(prompt)
            async with aclosing(client.generate_ids(ids, max_new_tokens=TOKENS)) as tokens:
                async for token in tokens:
                    outputs[index].append(token)
                    if len(outputs[index]) == 1:
                        await first_token.wait()  # every pipeline is open now

    async with trio.open_nursery() as nursery:
        for index, prompt in enumerate(PROMPTS):
            nursery.start_soon(one, index, prompt)
    assert first_token.arrived == len(PROMPTS)
    return outputs


def _mismatches(got: Sequence[list[int]], want: Sequence[list[int]]) -> list[str]:
    return [f"{PROMPTS[i]!r}: got {g}, want {w}"
            for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]


async def test_eight_concurrent_clients_generate_what_each_would_alone(
    tmp_path: Path, tiny_model: Path
) -> None:
    reference = await _local_reference(tiny_model)
    # Every reference decodes all its tokens (no early end of text), so the clients overlap
    # for the whole decode after the barrier.
    assert all(len(r) == TOKENS for r in reference)
    with trio.fail_after(240):
        async with Devnet(3, root=tmp_path / "net", model=tiny_model, spans=SPANS) as net:
            raw = await _concurrently(net, tiny_model, "raw")
            int8_alone = await _one_by_one(net, tiny_model, "int8-block")
            int8 = await _concurrently(net, tiny_model, "int8-block")
    assert _mismatches(raw, reference) == []
    assert _mismatches(int8, int8_alone) == []
    assert all(len(o) == TOKENS for o in int8_alone)
