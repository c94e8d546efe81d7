"""The client SDK: `async with Client(bootstrap=[...]) as c: async for text in c.generate(...)`.

Theory of operation
-------------------
A client joins the overlay as a host that serves nothing, watches the model's announcements
(`SwarmSource`), and for each generation:

1. tokenizes the prompt locally and works out the stages it needs from peers: `[1, L+1)` when
   it holds the checkpoint (it then runs the embedding and the head itself, so the prompt text
   and the sampled tokens never leave the machine), else `[0, L+2)`;
2. routes them (`find_route`: Dijkstra over peers x stages, RTT + serialization + compute +
   queueing + trust), waiting a bounded time for the swarm to cover the model, and naming the
   missing stages if it never does;
3. opens one session per hop — tasks in the client's own nursery, so a hop's streams outlive
   no client and no generator — and runs the generation loop of `_generate` over them, sampling
   every token here.

Every hop's failure surfaces as `HopFailedError`/`RefusedError` from the step that met it; the
generation turns it into a one-line `GenerationError`. Sessions are closed (and so the servers'
caches freed) when the generation ends, however it ends.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import trio

from node._errors import GenerationError, HopFailedError, RefusedError
from node._generate import Forward, GenerationStats, check_positions, generate_ids, stream_text
from node._local import LocalStages, SharedHead
from node._pipeline import Pipeline, prefer_push
from node._protocol import PROTOCOL
from node._routing import (
    BanList,
    NoRouteError,
    Route,
    RouteRequest,
    find_route,
    format_stages,
)
from node._sampling import Sampler, SamplingParams
from node._snapshots import PeerSnapshot
from node._textgen import eos_id
from p2p import Host, HostConfig, Identity, SessionConfig, SessionPool, open_host, open_session_pool
from sharding import EMBEDDED_MODEL, Checkpoint, ModelConfig, Span, Tokenizer, available_cores


class SwarmSource(Protocol):
    """What the client needs to know of the swarm (an adapter over p2p announcements)."""

    def snapshots(self) -> list[PeerSnapshot]:
        """The live, verified peers of the model, as routing snapshots."""
        ...

    def addrs(self, peer_id: str) -> tuple[str, ...]:
        """Transport addresses a peer announced."""
        ...

    async def wait_changed(self) -> None:
        """Return when the set of announcements may have changed."""
        ...


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a client connects and what it asks of peers."""

    bootstrap: tuple[str, ...] = ()
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    mdns: bool = False
    codec: str = "int8-block"
    local_stages: bool = True
    route_timeout_s: float = 30.0
    step_timeout_s: float = 60.0
    dead_after_s: float = 5.0
    threads: int | None = None
    max_failovers: int = 8
    # "on", "off", or "auto": push first, client-driven once, then whichever measured faster.
    push: str = "auto"
    # Longer prompts go in chunks of this many tokens, sent back to back when pushing, so hops
    # on different machines work on different chunks at once (0 = one piece). Smaller chunks
    # overlap more but run less efficient matrix products.
    prefill_chunk: int = 128
    link_delay_s: float = 0.0
    link_bandwidth_bps: float = 0.0
    # Session streams to peers are kept this long after a generation for the next one (a
    # stream's open and teardown cost both ends CPU); 0 opens new ones every generation.
    keep_streams_s: float = 10.0

    def __post_init__(self) -> None:
        if self.push not in ("auto", "on", "off"):
            raise ValueError("push must be 'auto', 'on' or 'off'")
        if self.keep_streams_s < 0:
            raise ValueError("keep_streams_s must be >= 0")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = never chunk)")


@dataclass(slots=True)
class RunInfo:
    """What the last generation did: its route and timings (for the CLI summary)."""

    route: Route | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    local_stages: tuple[tuple[int, int], ...] = ()
    failovers: int = 0
    failover_s: float = 0.0
    push: bool = False

    def describe_route(self) -> str:
        parts = [f"local[{a},{b})" for a, b in self.local_stages if a == 0]
        if self.route is not None:
            parts += [f"{h.peer_id[-8:]}[{h.start},{h.end})" for h in self.route.hops]
        parts += [f"local[{a},{b})" for a, b in self.local_stages if a != 0]
        return " -> ".join(parts)


_HOP_FAILURES = (HopFailedError, RefusedError, trio.TooSlowError)


class Client:
    """A client of the swarm for one model."""

    def __init__(self, *, bootstrap: Sequence[str] = (), model: str | os.PathLike[str] | None
                 = EMBEDDED_MODEL, model_id: str | None = None,
                 config: ClientConfig | None = None, swarm: SwarmSource | None = None,
                 host: Host | None = None) -> None:
        self.config = config or ClientConfig()
        if bootstrap:
            self.config = dataclasses.replace(self.config, bootstrap=tuple(bootstrap))
        self.folder = Path(model) if model is not None else None
        if self.folder is None:
            raise GenerationError("a client needs a model folder (tokenizer and config)")
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.eos_id = eos_id(self.tokenizer, self.folder)
        self._checkpoint: Checkpoint | None = None
        has_weights = any(self.folder.glob("*.safetensors"))
        if has_weights:
            self._checkpoint = Checkpoint.open(self.folder)
            self.model_config: ModelConfig = self._checkpoint.config
            self.model_id = model_id or self._checkpoint.model_id
        else:
            if model_id is None:
                raise GenerationError("without the weights, pass model_id")
            self.model_config = ModelConfig.from_hf(_read_json(self.folder / "config.json"))
            self.model_id = model_id
        self._swarm = swarm
        self._host = host
        self._embed: Span | None = None
        self._head: SharedHead | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self.streams: SessionPool | None = None  # kept session streams (`keep_streams_s`)
        self.bans = BanList()
        # Seconds per decoded token, by whether the generation pushed (for `push="auto"`).
        self._latency: dict[bool, float] = {}
        self.limiter = trio.CapacityLimiter(1)
        self.last = RunInfo()

    async def __aenter__(self) -> Client:
        # If any step fails, the `async with` unwinds what was entered so far; on success
        # `pop_all` hands the contexts over to `__aexit__`.
        async with AsyncExitStack() as stack:
            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            if self._host is None:
                self._host = await stack.enter_async_context(open_host(
                    Identity.generate(),
                    HostConfig(listen_addrs=self.config.listen, bootstrap=self.config.bootstrap,
                               enable_mdns=self.config.mdns,
                               # It reads the DHT, and leaves: others should not keep it.
                               dht_server=False,
                               link_delay_s=self.config.link_delay_s,
                               link_bandwidth_bps=self.config.link_bandwidth_bps)))
            if self._swarm is None:
                from node._swarm import AnnouncementSwarm

                self._swarm = await stack.enter_async_context(
                    AnnouncementSwarm.watch(self._host, self.model_id))
            if self._checkpoint is not None and self.config.local_stages:
                n = self.model_config.num_stages
                self._embed = await trio.to_thread.run_sync(Span.load, self._checkpoint, 0, 1)
                head = await trio.to_thread.run_sync(Span.load, self._checkpoint, n - 1, n)
                self._head = SharedHead(head, limiter=self.limiter,
                                        threads=self.config.threads or available_cores())
            if self.config.keep_streams_s > 0:  # entered first, left after the hops' nursery
                self.streams = await stack.enter_async_context(open_session_pool(
                    self._host, PROTOCOL, config=SessionConfig(dead_after=self.config.dead_after_s),
                    idle_s=self.config.keep_streams_s))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def host(self) -> Host:
        if self._host is None:
            raise GenerationError("the client is not running (use `async with Client(...)`)")
        return self._host

    # -- routing -----------------------------------------------------------------------------

    def _needed(self) -> tuple[int, int]:
        n = self.model_config.num_stages
        return (1, n - 1) if self._embed is not None else (0, n)

    async def route(self, max_length: int, tokens: int,
                    stages: tuple[int, int] | None = None) -> Route:
        """A route for `stages` (default: all this client needs from peers), waiting a bounded
        time for the swarm to cover them, around banned peers."""
        swarm = self._swarm
        if swarm is None:
            raise GenerationError("the client is not running")
        first, last = stages or self._needed()
        request = RouteRequest(model_id=self.model_id, first=first, last=last,
                               tokens_in_flight=max(1, tokens), cache_tokens=max_length)
        error: NoRouteError | None = None
        with trio.move_on_after(self.config.route_timeout_s):
            while True:
                try:
                    return find_route(swarm.snapshots(), request=request,
                                      banned=self.bans.banned(now=time.monotonic()))
                except NoRouteError as exc:
                    error = exc
                await swarm.wait_changed()
        missing = format_stages(error.missing_stages) if error is not None else "?"
        # Told apart for the user: a swarm that lacks the stages, or no swarm reached at all
        # (a dead bootstrap, a devnet that is down).
        alone = self._host is not None and not self._host.connected_peers()
        hint = f" (connected to no peer; bootstrap: {_bootstraps(self.config.bootstrap)})" \
            if alone else ""
        raise GenerationError(f"no peer serves stages {missing} of model {self.model_id[:12]} "
                              f"after {self.config.route_timeout_s:.0f} s{hint}") from error

    # -- generation --------------------------------------------------------------------------

    def running(self) -> tuple[trio.Nursery, SwarmSource]:
        """The nursery hop sessions run in and the swarm view (inside `async with` only)."""
        if self._nursery is None or self._swarm is None:
            raise GenerationError("the client is not running (use `async with Client(...)`)")
        return self._nursery, self._swarm

    @asynccontextmanager
    async def _pipeline(self, max_length: int, tokens: int,
                        info: RunInfo) -> AsyncIterator[Forward]:
        """Route, open every hop, and yield the `forward` of the generation loop."""
        check_positions(tokens, max_length - tokens, self.model_config.max_position_embeddings)
        embed = head = None
        if self._embed is not None and self._head is not None:
            n = self.model_config.num_stages
            embed = LocalStages(self._embed, max_length=max_length, limiter=self.limiter,
                                inline=True)
            head = self._head
            info.local_stages = ((0, 1), (n - 1, n))
        want_push = self.config.push == "on" or (self.config.push == "auto"
                                                 and prefer_push(self._latency))
        pipeline = Pipeline(self, max_length=max_length, prompt_tokens=tokens, info=info,
                            embed=embed, head=head, want_push=want_push)
        if head is not None:
            head.users += 1
        try:
            await pipeline.open_route()
            yield pipeline.forward
        except RefusedError as exc:
            raise GenerationError(str(exc)) from exc
        finally:
            if head is not None:
                head.users -= 1
            await pipeline.aclose()  # raises at once when cancelled: keep it last
        self._measured(info)

    def _measured(self, info: RunInfo) -> None:
        """Fold a clean generation's decode speed into the per-mode estimate (`auto` push)."""
        route = info.route
        if info.failovers or route is None or len(route.hops) < 2 \
                or info.stats.decode_tokens_per_s <= 0 or info.stats.new_tokens < 4:
            return
        seconds = 1.0 / info.stats.decode_tokens_per_s
        old = self._latency.get(info.push)
        self._latency[info.push] = seconds if old is None else 0.5 * (old + seconds)

    async def generate_ids(
        self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
    ) -> AsyncGenerator[int, None]:
        """Stream sampled token ids for a tokenized prompt (no stop strings)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens)
        info = RunInfo()
        self.last = info
        async with self._pipeline(len(prompt_ids) + max_new_tokens, len(prompt_ids),
                                  info) as forward:
            tokens = generate_ids(forward, prompt_ids, Sampler(params), eos_id=self.eos_id,
                                  stats=info.stats)
            async with aclosing(tokens):
                async for token in tokens:
                    yield token

    async def generate(
        self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[str, None]:
        """Stream the completion of `prompt`, text piece by text piece."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens, stop=tuple(stop))
        prompt_ids = self.tokenizer.encode(prompt)
        info = RunInfo()
        self.last = info
        async with self._pipeline(len(prompt_ids) + max_new_tokens, len(prompt_ids),
                                  info) as forward:
            tokens = generate_ids(forward, prompt_ids, Sampler(params), eos_id=self.eos_id,
                                  stats=info.stats)
            pieces = stream_text(tokens, self.tokenizer, params.stop, stats=info.stats)
            async with aclosing(pieces):
                async for piece in pieces:
                    yield piece

    def _failed(self, exc: HopFailedError | RefusedError) -> None:
        if isinstance(exc, HopFailedError):
            self.bans = self.bans.record_failure(exc.peer_id, now=time.monotonic())

    async def generate_text(self, prompt: str, **kwargs: object) -> str:
        """The whole completion as one string."""
        pieces = self.generate(prompt, **kwargs)  # type: ignore[arg-type]
        async with aclosing(pieces):
            return "".join([p async for p in pieces])


def generate_blocking(prompt: str, *, bootstrap: Sequence[str],
                      model: str | os.PathLike[str] = EMBEDDED_MODEL, **kwargs: object) -> str:
    """A blocking convenience for scripts: connect, generate, disconnect."""

    async def run() -> str:
        async with Client(bootstrap=bootstrap, model=model) as client:
            return await client.generate_text(prompt, **kwargs)

    return trio.run(run)


def _read_json(path: Path) -> dict[str, object]:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: not a JSON object")
    return data


def _bootstraps(addrs: tuple[str, ...]) -> str:
    """The bootstrap addresses for a message: the first, and how many more."""
    if not addrs:
        return "none given"
    return addrs[0] + (f" and {len(addrs) - 1} more" if len(addrs) > 1 else "")
