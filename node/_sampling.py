"""Client-side sampling: next-token choice from logits, and where stop strings cut the text.

Theory of operation
-------------------
Sampling always runs on the client, so it needs no trust in peers and is reproducible: the
same prompt, model and seed give the same tokens on any run and any machine. For that, logits
are moved to the CPU as float32 before anything else (GPU kernels and half precision are not
bit-reproducible across hardware), and the only randomness is one uniform draw per token from a
CPU `torch.Generator` (MT19937, stable across torch releases) seeded once per generation. The
draw picks a token by inverse CDF over float64 cumulative probabilities, which we write out
rather than call `torch.multinomial`, whose algorithm is not part of torch's contract.

The distribution, in the usual order: temperature 0 is greedy (argmax, lowest token id on
ties, no randomness used); otherwise top-k keeps the k highest logits, temperature scales them,
softmax normalises, and top-p keeps the smallest prefix of the ranking whose mass reaches p.
Ranking uses a stable sort of the logits themselves, so ties go to the lowest token id and
top-k = 1 is exactly greedy. NaN or infinite logits mean a broken or lying peer served the
head; they raise `InvalidLogitsError` (a `ValueError`) so the caller can blame the hop.

Stop strings are matched on decoded text, not tokens, since one stop string may span tokens
and a token may hold the end of one and the start of another. `check_stop` says how much text
is safe to show: up to the first stop string if there is one, else all of it except a tail that
could still grow into a stop string. What is shown never has to be taken back.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from node._snapshots import _is_int

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


class InvalidLogitsError(ValueError):
    """Logits that cannot be sampled from: wrong shape or dtype, NaN or infinite values."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop. Every field is checked on construction.

    Errors are all `ValueError`, including for wrong types: these values arrive from users
    through the HTTP API, and one exception type maps to one "400 bad request".

    Attributes:
        temperature: 0 for greedy decoding; otherwise divides the logits (>0, finite).
        top_k: Keep only the k most likely tokens; 0 disables.
        top_p: Nucleus sampling: keep the smallest set of tokens whose mass reaches it;
            1 disables. In (0, 1].
        seed: Seed for this generation's generator; `None` draws one (see `Sampler.seed`).
        max_new_tokens: Most tokens to generate, >= 1.
        stop: Strings that end the generation; the text shown never includes them.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0): no randomness, top-k/top-p unused."""
        return self.temperature == 0


def token_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `Sampler` draws from: float32 on the CPU, zero outside the kept set.

    Exposed so the filtering can be checked exactly, without sampling.

    Raises:
        InvalidLogitsError: Logits not 1-D floating point, empty, NaN or infinite.
    """
    x = _checked_logits(logits)
    n = x.numel()
    out = torch.zeros(n, dtype=torch.float32)
    if params.greedy:
        out[int(torch.argmax(x))] = 1.0  # argmax returns the first maximum
        return out
    if params.top_k == 0 and params.top_p == 1.0:
        return torch.softmax((x - x.max()) / params.temperature, dim=0)
    order = torch.sort(x, descending=True, stable=True).indices
    keep = n if params.top_k == 0 else min(params.top_k, n)
    ranked = x[order[:keep]]
    # Subtract the max before dividing so a tiny temperature cannot overflow to inf.
    probs = torch.softmax((ranked - ranked[0]) / params.temperature, dim=0)
    if params.top_p < 1.0:
        wide = probs.double()
        mass_before = torch.cumsum(wide, dim=0) - wide
        keep = int((mass_before < params.top_p).sum())  # >= 1: mass before the first is 0
        probs = probs[:keep] / probs[:keep].sum()
    out[order[:keep]] = probs
    return out


class Sampler:
    """Picks tokens for one generation; holds its seeded generator.

    Make one per generation: the generator's state is the generation's position in its random
    sequence, so sharing one across generations would make each depend on the others.
    """

    def __init__(self, params: SamplingParams) -> None:
        self._params = params
        # A drawn seed is kept so a surprising answer can be reproduced from the logs.
        self._seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self._seed)

    @property
    def params(self) -> SamplingParams:
        """The parameters this sampler was made with."""
        return self._params

    @property
    def seed(self) -> int:
        """The seed in use: `params.seed`, or the one drawn when it was `None`."""
        return self._seed

    def sample(self, logits: torch.Tensor) -> int:
        """The next token id for `logits` (1-D, one value per vocabulary entry).

        Raises:
            InvalidLogitsError: Logits not 1-D floating point, empty, NaN or infinite.
        """
        if self._params.greedy:  # what `token_probabilities` keeps, without building it
            return int(_checked_logits(logits).numpy().argmax())  # the first maximum
        probs = token_probabilities(logits, self._params)
        cdf = torch.cumsum(probs.double(), dim=0)
        u = float(torch.rand((), generator=self._generator, dtype=torch.float64))
        target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64)
        # First token whose cumulative mass exceeds the target; its own mass is > 0.
        index = int(torch.searchsorted(cdf, target, right=True)[0])
        if index >= probs.numel():  # u * total rounded up to total: take the last kept token
            index = int(torch.nonzero(probs).max())
        return index


@dataclass(frozen=True, slots=True)
class StopCheck:
    """What `check_stop` found.

    Attributes:
        emit_until: `text[:emit_until]` is safe to show the user now.
        stopped: A stop string starts at `emit_until`; the generation is over.
    """

    emit_until: int
    stopped: bool


def check_stop(text: str, stop: Sequence[str]) -> StopCheck:
    """How much of the decoded text so far may be shown, and whether a stop string ended it.

    With a stop string in `text`, cut at the earliest one. Without, hold back the longest tail
    of `text` that is the start of some stop string (it may complete with the next token); the
    rest is safe. Held-back text is shown on a later call once it can no longer become a stop
    string, so successive `emit_until` values never decrease and never pass a stop string.

    Call it with the whole decoded text each time (decoding token by token can split
    multi-byte characters; decoding the whole sequence does not). When generation ends for
    another reason (`max_new_tokens`, end of sequence), show the held-back tail too.
    """
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if found:
        return StopCheck(emit_until=min(found), stopped=True)
    held = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:length]):
                held = length
                break
    return StopCheck(emit_until=len(text) - held, stopped=False)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise InvalidLogitsError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 1 or logits.numel() == 0:
        raise InvalidLogitsError(
            f"logits must be 1-D with one value per token, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise InvalidLogitsError(f"logits must be floating point, got {logits.dtype}")
    x = logits.detach().to(device="cpu", dtype=torch.float32)
    # numpy's one pass, not torch's three operations: this runs once per token, cold, on
    # the generation's critical path.
    if not np.isfinite(x.numpy()).all():
        bad = ~torch.isfinite(x)
        first = int(torch.nonzero(bad)[0])
        raise InvalidLogitsError(
            f"logits hold {int(bad.sum())} NaN or infinite values "
            f"(first at token {first}: {float(x[first])})"
        )
    return x
