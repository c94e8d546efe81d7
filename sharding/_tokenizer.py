"""Text <-> token ids through the `tokenizers` library and a checkpoint's `tokenizer.json`."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from sharding._errors import CheckpointError


class Tokenizer:
    """A checkpoint's tokenizer: `encode` text to ids, `decode` ids to text."""

    def __init__(self, inner: _HFTokenizer) -> None:
        self._inner = inner

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{Path(folder)}: no tokenizer.json")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - the Rust binding raises a bare Exception
            raise CheckpointError(f"{path}: not a valid tokenizer ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        return int(self._inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._inner.decode(ids, skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        """Id of a special token such as an end-of-text marker, or None."""
        value = self._inner.token_to_id(token)
        return None if value is None else int(value)
