"""End to end on loopback: nodes serve spans, a client generates through them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from node import GenerationError
from node._client import Client, ClientConfig
from node._sampling import SamplingParams
from node._textgen import LocalModel


async def _local(model: Path, prompt: str, params: SamplingParams) -> str:
    return "".join([p async for p in LocalModel(model).generate(prompt, params)])


@pytest.mark.parametrize("codec", ["raw", "int8-block"])
async def test_three_nodes_generate_what_the_single_process_engine_does(
    tiny_model: Path, codec: str, loopback_swarm: Any
) -> None:
    prompt = "The list type"
    expected = await _local(tiny_model, prompt, SamplingParams(temperature=0,
                                                               max_new_tokens=24))
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:2", "2:4", "4:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec=codec, route_timeout_s=20)) as client:
            text = await client.generate_text(prompt, max_new_tokens=24)
            route = client.last.route
    assert route is not None and len(route.hops) >= 2
    if codec == "raw":
        assert text == expected
    else:  # quantized activations: report agreement; on this random model it is high
        agree = sum(a == b for a, b in zip(text, expected, strict=False)) / len(expected)
        assert agree >= 0.5, (text, expected)


async def test_a_client_without_weights_sends_token_ids(
    tmp_path: Path, tiny_model: Path, loopback_swarm: Any
) -> None:
    light = tmp_path / "light"
    light.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model / name, light / name)
    from sharding import Checkpoint

    model_id = Checkpoint.open(tiny_model).model_id
    params = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=16)
    expected = await _local(tiny_model, "def ", params)
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=light, model_id=model_id,
                       config=ClientConfig(codec="raw", route_timeout_s=20)) as client:
            text = await client.generate_text("def ", max_new_tokens=16, temperature=0.8,
                                              top_k=20, seed=5)
            assert client.last.route is not None
            assert [(h.start, h.end) for h in client.last.route.hops] == [(0, 6)]
    assert text == expected


async def test_missing_stages_are_named_after_a_bounded_wait(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:3"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(route_timeout_s=2)) as client:
            with pytest.raises(GenerationError, match="no peer serves stages 3-4") as info:
                await client.generate_text("x", max_new_tokens=4)
    assert "connected to no peer" not in str(info.value)  # the swarm was reached


async def test_a_bootstrap_nobody_answers_at_is_named(
    tiny_model: Path, dead_bootstrap: str
) -> None:
    """A dead bootstrap (a devnet that is down) reads differently from a swarm that lacks
    the stages: the client reached no peer at all."""
    with trio.fail_after(30):
        async with Client(bootstrap=[dead_bootstrap], model=tiny_model,
                          config=ClientConfig(route_timeout_s=1)) as client:
            with pytest.raises(GenerationError) as info:
                await client.generate_text("x", max_new_tokens=4)
    assert str(info.value).endswith(f"(connected to no peer; bootstrap: {dead_bootstrap})")


async def test_prompt_longer_than_the_model_is_refused(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model) as client:
            with pytest.raises(GenerationError, match="exceeds the model's 512 positions"):
                await client.generate_text("x" * 600, max_new_tokens=4)
