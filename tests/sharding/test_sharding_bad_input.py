"""Broken checkpoints fail with a clear error naming what is wrong, before loading weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharding import Checkpoint, CheckpointError, ConfigError, Span, SpanError

Factory = Callable[..., tuple[Any, Path]]


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every stage whose weights get read, to prove errors come before any read."""
    reads: list[int] = []
    original = Checkpoint.load_stage

    def spy(self: Checkpoint, stage: int, **kw: Any) -> dict[str, torch.Tensor]:
        reads.append(stage)
        return original(self, stage, **kw)

    monkeypatch.setattr(Checkpoint, "load_stage", spy)
    return reads


def test_missing_tensor_is_named(hf_checkpoint: Factory, no_weight_reads: list[int]) -> None:
    _, folder = hf_checkpoint("llama3")
    _edit_tensors(folder, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.up_proj"):
        Span.load(folder, 0, 5)
    assert no_weight_reads == []
    Span.load(folder, 0, 3)  # stages that do not need the tensor still load


def test_wrong_shape_is_named(hf_checkpoint: Factory, no_weight_reads: list[int]) -> None:
    _, folder = hf_checkpoint("qwen2")

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(5)

    _edit_tensors(folder, shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.bias' has shape \[5\], expected \[32\]"):
        Span.load(folder, 0, 5)
    assert no_weight_reads == []


def test_config_that_does_not_match_the_tensors(
    hf_checkpoint: Factory, no_weight_reads: list[int]
) -> None:
    _, folder = hf_checkpoint("llama3")
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(CheckpointError, match="gate_proj.weight' has shape"):
        Span.load(folder, 1, 2)
    assert no_weight_reads == []


def test_unsupported_dtype_is_named(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama2")

    def to_f64(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"].double()

    _edit_tensors(folder, to_f64)
    with pytest.raises(CheckpointError, match="model.norm.weight' has dtype F64"):
        Span.load(folder, 3, 4)


def test_unknown_family_and_bad_config(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama2")
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(ConfigError, match="unknown model family 'gpt2'"):
        Checkpoint.open(folder)
    _edit_config(folder, model_type="llama", num_key_value_heads=3)
    with pytest.raises(ConfigError, match="not a multiple"):
        Checkpoint.open(folder)
    _edit_config(folder, num_key_value_heads=4, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act"):
        Checkpoint.open(folder)
    _edit_config(folder, hidden_act="silu", vocab_size="many")
    with pytest.raises(ConfigError, match="vocab_size"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("span", [(0, 6), (-1, 2), (3, 3), (4, 2)])
def test_span_outside_the_model(
    hf_checkpoint: Factory, span: tuple[int, int], no_weight_reads: list[int]
) -> None:
    _, folder = hf_checkpoint("llama3")  # 3 blocks: stages 0..4
    with pytest.raises(SpanError, match=r"outside the model's stages \[0, 5\)"):
        Span.load(folder, *span)
    assert no_weight_reads == []


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Checkpoint.open(tmp_path)


def test_corrupt_safetensors_header(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama2")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[0:8] = (1 << 40).to_bytes(8, "little")  # a header length far past the file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length"):
        Checkpoint.open(folder)
