"""`Checkpoint`: a Hugging Face checkpoint folder, read one stage at a time.

Theory of operation: opening a checkpoint reads `config.json` and only the JSON headers of its
`*.safetensors` files (names, dtypes, shapes, byte ranges). Every stage's tensors are checked
against the shapes the config implies before a single weight byte is read, so a broken or
mismatched checkpoint fails with a message naming the tensor, before any large allocation.
Loading a stage then reads just that stage's byte ranges (safetensors maps the file lazily).

`model_id` is the SHA-256 of a manifest: the normalised config plus one hash per stage over
that stage's tensor names, dtypes, shapes and bytes. Two peers that compute the same id hold the
same weights, whatever the folder is called. Hashing reads the whole checkpoint once; the
result is cached beside the data (or in the user's cache directory when the folder is
read-only), keyed by the files' sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sharding._config import ModelConfig
from sharding._errors import CheckpointError, ConfigError, SpanError
from sharding._families import Family, family_for

# safetensors dtype spelling -> torch dtype, for the float types a decoder's weights may use.
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_MAX_HEADER = 64 << 20  # a header larger than this is not a checkpoint we should parse
_CACHE_NAME = ".shardnet.manifest-cache.json"
_MANIFEST_FORMAT = "shardnet-manifest/1"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header (bounded), without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path.name}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path.name}: header length {header_len} is not plausible")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path.name}: header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    data_start = 8 + header_len
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: malformed header entry for {name!r}") from exc
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed shape")
        if not (isinstance(begin, int) and isinstance(end, int)
                and 0 <= begin <= end <= size - data_start):
            raise CheckpointError(f"{path.name}: tensor {name!r} has out-of-file offsets")
        out[name] = TensorInfo(path, str(dtype), shape, data_start + begin, data_start + end)
    return out


class Checkpoint:
    """A checkpoint folder: its config, family, and an index of every tensor's header."""

    def __init__(self, folder: Path, config: ModelConfig, family: Family,
                 tensors: dict[str, TensorInfo]) -> None:
        self.folder = folder
        self.config = config
        self.family = family
        self.tensors = tensors
        self._model_id: str | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Checkpoint:
        """Read `config.json` and the safetensors headers of a folder."""
        path = Path(folder)
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: no config.json") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path / 'config.json'}: not valid JSON") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path / 'config.json'}: not a JSON object")
        family = family_for(raw)
        config = family.parse_config(raw)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two files")
                tensors[name] = info
        return cls(path, config, family, tensors)

    def expected_shapes(self, stage: int) -> dict[str, tuple[int, ...]]:
        """Our logical name -> the shape the config implies, for one stage."""
        c = self.config
        C, V, I, D = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
        if stage == 0:
            return {"embed": (V, C)}
        if stage == c.head_stage:
            return {"norm": (C,), "lm_head": (V, C)}
        shapes = {
            "attn_norm": (C,), "mlp_norm": (C,),
            "wq": (c.num_heads * D, C), "wk": (c.num_kv_heads * D, C),
            "wv": (c.num_kv_heads * D, C), "wo": (C, c.num_heads * D),
            "w_gate": (I, C), "w_up": (I, C), "w_down": (C, I),
        }
        if c.qkv_bias:
            shapes |= {"bq": (c.num_heads * D,), "bk": (c.num_kv_heads * D,),
                       "bv": (c.num_kv_heads * D,)}
        if c.o_bias:
            shapes["bo"] = (C,)
        return shapes

    def check_span(self, start: int, end: int) -> None:
        """Raise `SpanError` unless `[start, end)` is a non-empty range of this model's stages."""
        n = self.config.num_stages
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
            raise SpanError(f"span [{start}, {end}) is outside the model's stages [0, {n})")

    def stage_tensors(self, stage: int) -> dict[str, TensorInfo]:
        """Validated tensor infos for one stage: present, right shape, a supported dtype."""
        self.check_span(stage, stage + 1)
        names = self.family.stage_names(self.config, stage)
        shapes = self.expected_shapes(stage)
        out: dict[str, TensorInfo] = {}
        for ours, theirs in names.items():
            info = self.tensors.get(theirs)
            if info is None:
                raise CheckpointError(f"{self.folder}: missing tensor {theirs!r} (stage {stage})")
            if info.shape != shapes[ours]:
                raise CheckpointError(
                    f"{self.folder}: tensor {theirs!r} has shape {list(info.shape)}, "
                    f"expected {list(shapes[ours])} for this config"
                )
            if info.dtype not in _DTYPES:
                raise CheckpointError(
                    f"{self.folder}: tensor {theirs!r} has dtype {info.dtype}, "
                    f"expected one of {', '.join(_DTYPES)}"
                )
            itemsize = _DTYPES[info.dtype].itemsize
            if info.end - info.begin != itemsize * _numel(info.shape):
                raise CheckpointError(f"{self.folder}: tensor {theirs!r} has a wrong byte length")
            out[ours] = info
        return out

    def stage_nbytes(self, stage: int, dtype: torch.dtype) -> int:
        """Bytes one stage's weights take in memory at `dtype` (for span planning)."""
        return sum(_numel(s) * dtype.itemsize for s in self.expected_shapes(stage).values())

    def load_stage(self, stage: int, *, dtype: torch.dtype,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """Read one stage's tensors (only its byte ranges), cast to `dtype` on `device`."""
        infos = self.stage_tensors(stage)
        names = self.family.stage_names(self.config, stage)
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for ours, info in infos.items():
            by_file.setdefault(info.file, []).append(ours)
        for file, ours_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for ours in ours_names:
                    out[ours] = f.get_tensor(names[ours]).to(device=device, dtype=dtype)
        return out

    # -- identity ---------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """Config plus a hash per stage: what `model_id` is the hash of."""
        return self._cached()["manifest"]  # type: ignore[no-any-return]

    @property
    def model_id(self) -> str:
        """Content hash of the manifest (hex SHA-256)."""
        if self._model_id is None:
            self._model_id = str(self._cached()["model_id"])
        return self._model_id

    def _fingerprint(self) -> list[list[Any]]:
        files = [self.folder / "config.json", *sorted({i.file for i in self.tensors.values()})]
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    def _cache_paths(self) -> list[Path]:
        user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardnet"
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:32]
        return [self.folder / _CACHE_NAME, user / "manifests" / f"{digest}.json"]

    def _cached(self) -> dict[str, Any]:
        fingerprint = self._fingerprint()
        for path in self._cache_paths():
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint:
                return entry
        manifest = {
            "format": _MANIFEST_FORMAT,
            "config": self.config.to_dict(),
            "stages": [self._stage_hash(s) for s in range(self.config.num_stages)],
        }
        entry = {"fingerprint": fingerprint, "manifest": manifest,
                 "model_id": hashlib.sha256(_canonical(manifest)).hexdigest()}
        for path in self._cache_paths():
            if _write_atomic(path, json.dumps(entry).encode()):
                break
        return entry

    def _stage_hash(self, stage: int) -> str:
        h = hashlib.sha256()
        infos = self.stage_tensors(stage)
        for ours in sorted(infos):
            info = infos[ours]
            h.update(_canonical({"name": ours, "dtype": info.dtype, "shape": list(info.shape)}))
            with info.file.open("rb") as f:
                f.seek(info.begin)
                remaining = info.end - info.begin
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise CheckpointError(f"{info.file.name}: truncated tensor data")
                    h.update(chunk)
                    remaining -= len(chunk)
        return h.hexdigest()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write via a temporary file and rename; False when the place is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
