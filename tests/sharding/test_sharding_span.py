"""Spans: chaining, caching, rollback, batching, and the model id."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, DeviceError, PositionError, Span, SpanError, pick_device

Factory = Callable[..., tuple[Any, Path]]


def _ids(vocab: int, n: int, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_chain_of_spans_equals_the_whole_model(name: str, hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint(name)
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages  # 5: embed, 3 blocks, head
    whole = Span.load(ckpt, 0, n)
    ids = _ids(ckpt.config.vocab_size, 11)
    with torch.no_grad():
        expected = whole(ids)
        for a, b in [(1, 2), (1, 4), (2, 3), (3, 4)]:
            parts = [Span.load(ckpt, 0, a), Span.load(ckpt, a, b), Span.load(ckpt, b, n)]
            x: torch.Tensor = ids
            for part in parts:
                x = part(x)
            assert torch.equal(x, expected), (a, b)


def test_cached_chain_decode_equals_uncached_recomputation(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    parts = [Span.load(ckpt, 0, 2), Span.load(ckpt, 2, 4), Span.load(ckpt, 4, 5)]
    whole = Span.load(ckpt, 0, 5)
    caches = [p.new_cache(32) for p in parts]
    ids = _ids(101, 6)
    with torch.no_grad():
        x = ids
        for p, c in zip(parts, caches, strict=True):
            x = p(x, c, last_only=True)
        seq = ids
        for _ in range(10):
            ref = whole(seq)[:, -1:]  # uncached recomputation of the whole sequence
            assert (x - ref).abs().max().item() <= 1e-5
            nxt = x[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            x = nxt
            for p, c in zip(parts, caches, strict=True):
                x = p(x, c, last_only=True)
    assert all(c.length == 16 for c in caches)


def test_rollback_replays_to_the_same_result(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("mistral")
    span = Span.load(folder, 0, 4)
    cache = span.new_cache(40)
    ids = _ids(103, 20)
    with torch.no_grad():
        span(ids[:, :12], cache)
        first = span(ids[:, 12:20], cache)
        cache.rollback(12)
        again = span(ids[:, 12:20], cache)
        cache.rollback(5)  # branch from an earlier point: replay 5..20 token by token
        steps = [span(ids[:, t : t + 1], cache) for t in range(5, 20)]
    assert torch.equal(first, again)
    assert (torch.cat(steps, dim=1)[:, -8:] - first).abs().max().item() <= 1e-5


def test_batched_decode_equals_one_session_at_a_time(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    span = Span.load(folder, 0, 5)
    prompts = [_ids(101, n, seed=n) for n in (3, 7, 5)]  # sessions at different positions
    solo = [span.new_cache(16) for _ in prompts]
    batch = [span.new_cache(16) for _ in prompts]
    nxt = torch.tensor([[1], [2], [3]])
    with torch.no_grad():
        for p, a, b in zip(prompts, solo, batch, strict=True):
            span(p, a)
            span(p, b)
        expected = torch.cat([span(nxt[i : i + 1], solo[i]) for i in range(3)])
        got = span.forward_batch(nxt, batch)
    assert (got - expected).abs().max().item() <= 1e-5
    assert [c.length for c in batch] == [4, 8, 6]


def test_positions_are_checked(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama2")
    span = Span.load(folder, 0, 2)
    cache = span.new_cache(8)
    with torch.no_grad():
        span(_ids(97, 6), cache)
        with pytest.raises(PositionError, match="past max_length"):
            span(_ids(97, 3), cache)
        assert cache.length == 6  # the refused step changed nothing
        with pytest.raises(PositionError, match="roll back"):
            cache.check_step(7, 1)
        with pytest.raises(PositionError):
            cache.rollback(7)
    with pytest.raises(PositionError, match="max_length"):
        span.new_cache(10_000)


def test_inputs_are_checked(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama2")
    first, middle = Span.load(folder, 0, 2), Span.load(folder, 2, 4)
    with pytest.raises(SpanError, match="token ids"):
        first(torch.zeros(1, 3, 48))
    with pytest.raises(SpanError, match=r"\[0, 97\)"):
        first(torch.tensor([[1, 97]]))
    with pytest.raises(SpanError, match="hidden states"):
        middle(torch.zeros(1, 3, 47))
    with pytest.raises(SpanError, match="hidden states"):
        middle(torch.zeros(1, 3, 48, dtype=torch.int64))
    with pytest.raises(SpanError, match="batch"):
        middle(torch.zeros(2, 1, 48), middle.new_cache(4))


def test_model_id_is_a_content_hash_cached_beside_the_data(
    hf_checkpoint: Factory, tmp_path: Path
) -> None:
    _, folder = hf_checkpoint("qwen2")
    ckpt = Checkpoint.open(folder)
    model_id = ckpt.model_id
    assert len(model_id) == 64
    assert (folder / ".shardnet.manifest-cache.json").is_file()
    renamed = tmp_path / "another-name"
    shutil.copytree(folder, renamed)
    (renamed / ".shardnet.manifest-cache.json").unlink()
    assert Checkpoint.open(renamed).model_id == model_id  # names do not matter
    _, other = hf_checkpoint("qwen2", seed=1)
    assert Checkpoint.open(other).model_id != model_id  # weights do
    manifest = ckpt.manifest()
    assert len(manifest["stages"]) == ckpt.config.num_stages


def test_a_sub_range_of_a_span_runs_like_a_span_of_its_own(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    big = Span.load(folder, 0, 5)
    ids = _ids(101, 7)
    with torch.no_grad():
        h = Span.load(folder, 0, 2)(ids)
        expected = Span.load(folder, 2, 4)(h)
        cache = big.new_cache(16, stages=(2, 4))
        assert cache.keys.shape[0] == 2
        got = big(h, cache, stages=(2, 4))
        assert torch.equal(got, expected)
        with pytest.raises(SpanError, match="cache holds 2 blocks"):
            big(h[:, :1], cache, stages=(1, 4))
    with pytest.raises(SpanError, match="not inside this span"):
        Span.load(folder, 1, 3).new_cache(4, stages=(0, 2))


def test_pick_device_checks_the_name_it_is_given() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="not a device: 'warp9'"):
        pick_device("warp9")
    with pytest.raises(DeviceError, match="'cuda:99'"):
        pick_device("cuda:99")
