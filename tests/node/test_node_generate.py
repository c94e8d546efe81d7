"""The generation loop: greedy equals an argmax loop, seeds reproduce, stop strings cut."""

from __future__ import annotations

from pathlib import Path

import torch

from node._generate import GenerationStats, generate_text
from node._sampling import SamplingParams
from node._textgen import LocalModel


async def _collect(model: LocalModel, prompt: str, params: SamplingParams,
                   stats: GenerationStats | None = None) -> str:
    return "".join([p async for p in model.generate(prompt, params, stats)])


async def test_greedy_generation_is_the_argmax_loop(tiny_model: Path) -> None:
    model = LocalModel(tiny_model)
    prompt = "The list type"
    stats = GenerationStats()
    text = await _collect(model, prompt, SamplingParams(temperature=0, max_new_tokens=24), stats)
    ids = model.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(24):
            nxt = int(model.span(torch.tensor([ids]))[0, -1].argmax())
            if nxt == model.eos_id:
                break
            ids.append(nxt)
    expected = model.tokenizer.decode(ids[len(model.tokenizer.encode(prompt)):])
    assert text == expected
    assert stats.new_tokens == len(ids) - len(model.tokenizer.encode(prompt))
    assert stats.first_token_s > 0


async def test_seeded_sampling_reproduces_and_seeds_differ(tiny_model: Path) -> None:
    model = LocalModel(tiny_model)
    params = [SamplingParams(temperature=1.0, top_k=40, seed=s, max_new_tokens=32)
              for s in (7, 7, 8)]
    a, b, c = [await _collect(model, "def ", p) for p in params]
    assert a == b
    assert a != c


async def test_stop_strings_end_the_text_before_them(tiny_model: Path) -> None:
    model = LocalModel(tiny_model)
    full = await _collect(model, "x", SamplingParams(temperature=0, max_new_tokens=40))
    stop = full[10:13]  # a string the greedy continuation is known to produce
    stats = GenerationStats()
    cut = await _collect(model, "x", SamplingParams(temperature=0, max_new_tokens=40,
                                                    stop=(stop,)), stats)
    assert cut == full[: full.index(stop)]
    assert stats.stopped_by == "stop"


async def test_forward_is_called_once_per_token_after_prefill(tiny_model: Path) -> None:
    model = LocalModel(tiny_model)
    calls: list[tuple[int, int]] = []

    async def forward(position: int, ids: torch.Tensor) -> torch.Tensor:
        calls.append((position, ids.shape[1]))
        logits = torch.zeros(264)
        logits[65 + len(calls) % 3] = 1.0
        return logits

    pieces = [p async for p in generate_text(forward, model.tokenizer, "hello",
                                             SamplingParams(temperature=0, max_new_tokens=4),
                                             eos_id=256)]
    assert "".join(pieces) == "BCAB"
    assert calls == [(0, 5), (5, 1), (6, 1), (7, 1)]
