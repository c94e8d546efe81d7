"""The node daemon: join the overlay, pick and load a span, serve it, move, leave cleanly.

Theory of operation
-------------------
`run_node` is one structured lifetime:

1. load the identity from the data directory (same peer id across restarts) and open the host;
2. announce `joining`; pick the span — `auto` waits a random jitter (so nodes started together
   do not all pick the same span), looks at the announced swarm, and calls the pure
   `choose_span` — then load it off the event loop;
3. measure the span's throughput, serve `/shardnet/inference/1`, announce `online`, and keep
   re-announcing (load, free cache) on a timer;
4. `auto` nodes look at the swarm every `rebalance_interval_s` (jittered) and move when the
   pure `should_rebalance` says the swarm would be clearly better balanced (see "Moving");
5. a clock watch notices a sleep (see "Waking up") and re-announces at once;
6. on SIGINT/SIGTERM: stop admitting sessions, announce `draining`, let open sessions finish for
   a grace period, then leave (total well under the ~5 s a supervisor waits).

The bootstrap role runs steps 1, 5 (re-dialing only) and 6: a host with the DHT and gossip,
serving no model. Every state change is also written to `status.json` for the devnet and for
people (with the current span, and how many times the node moved and woke up).

Moving
------
Nodes whose stages others also serve all see a new gap at about the same moment, but each
acts at its own (jittered) tick. A node that wants to move waits, for each peer ahead of it in
`move_rank`'s order (by peer id among the peers that could move), the longest a tick can take
plus a settle period, and a random half settle period on top; then it asks `should_rebalance`
again on the fresh view. The first mover's claim has reached the others by then, so they
stay. A move: stop admitting sessions; announce `joining`
at the *target* span at once (unroutable, like `draining`, but it also claims the gap, so the
others' re-check counts it); let open sessions finish (at most `grace_s`; sessions still open
after that keep the old span alive through their own reference until they end); free the old
span; load the new one off the event loop; measure it; serve it; announce `online`. While the
node holds no span, a session request gets a retryable `closing` refusal. `should_rebalance`'s
margin and the re-check keep a balanced swarm still: every move strictly lowers the number of
unserved stages or raises the bottleneck by the margin, so moves cannot cycle.

Waking up
---------
A laptop that slept has records in the swarm that expired while it was away, and may have lost
its connections. Every `wake_check_interval_s` the node reads the wall clock and the monotonic
clock; `detect_clock_jump` (pure) reports a sleep when the two moved apart by more than
`clock_jump_s` (Linux's monotonic clock stops during suspend, the wall clock does not; an NTP
step looks the same, and also calls for a fresh expiry) or when the monotonic clock moved
`clock_jump_s` past the tick (a stopped process). The node then re-announces at once (a new
sequence number and a fresh expiry), re-dials bootstrap peers it is no longer connected to
(and announces again if it had to), and holds rebalancing until fresh announcements had time
to arrive, so it never moves on a view that emptied while it slept.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio

from node._errors import NodeError
from node._service import serve_inference
from node._snapshots import StageSpan
from node._span_choice import (
    choose_span,
    move_rank,
    should_rebalance,
    stage_memory_bytes,
    startup_jitter_s,
)
from node._status import write_status
from node._worker import ServerLimits, SpanWorker
from p2p import (
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    DialError,
    Host,
    HostConfig,
    Identity,
    SessionConfig,
    SessionPool,
    SessionStream,
    open_host,
    open_session_pool,
    parse_peer_addr,
)
from sharding import EMBEDDED_MODEL, Checkpoint, Span, available_cores, compute_dtype, pick_device

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from node._swarm import AnnouncementSwarm

logger = logging.getLogger(__name__)
VERSION = "0.1.0"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node daemon is told (flags and/or a TOML file).

    The timing fields are seconds. `rebalance_interval_s` 0 turns moving off (a node with a
    fixed `a:b` span never moves); `link_delay_s` and `link_bandwidth_bps` (bytes/s, 0 =
    unlimited) shape what the host sends, to emulate a WAN link (see `p2p.HostConfig`).
    """

    data_dir: Path
    model: Path = EMBEDDED_MODEL
    span: str = "auto"
    memory_budget_bytes: int = 4 << 30
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    threads: int = 1
    prefill_threads: int | None = None
    packed_weights: str = "auto"
    device: str | None = None
    mdns: bool = True
    limits: ServerLimits = field(default_factory=ServerLimits)
    grace_s: float = 3.0
    announce_interval_s: float = 2.0
    announce_ttl_s: float = 10.0
    jitter_s: float = 1.0
    swarm_settle_s: float = 1.0
    dead_after_s: float = 5.0
    rebalance_interval_s: float = 30.0
    rebalance_min_improvement: float = 1.2
    wake_check_interval_s: float = 1.0
    clock_jump_s: float = 5.0
    link_delay_s: float = 0.0
    link_bandwidth_bps: float = 0.0

    def __post_init__(self) -> None:
        for name in ("grace_s", "jitter_s", "swarm_settle_s", "rebalance_interval_s",
                     "link_delay_s", "link_bandwidth_bps"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("announce_interval_s", "announce_ttl_s", "dead_after_s",
                     "wake_check_interval_s", "clock_jump_s"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        value = self.rebalance_min_improvement
        if not _is_number(value) or not 1 <= value < math.inf:
            raise ValueError(f"rebalance_min_improvement must be >= 1, got {value!r}")
        if self.packed_weights not in PACKED_WEIGHTS:
            raise ValueError(f"packed_weights must be one of {', '.join(PACKED_WEIGHTS)}, "
                             f"got {self.packed_weights!r}")
        for name in ("threads", "prefill_threads"):
            value = getattr(self, name)
            if not (value is None and name == "prefill_threads") \
                    and not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> NodeConfig:
        """Read a TOML file whose keys are this class's field names; flags override it."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise NodeError(f"{path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known - {"max_sessions", "max_cache_tokens", "max_length"}
        if unknown:
            raise NodeError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        _check_toml_types(path, raw)
        limits = ServerLimits(**{k: raw.pop(k) for k in ("max_sessions", "max_cache_tokens",
                                                          "max_length") if k in raw})
        values: dict[str, Any] = {"limits": limits, **raw, **overrides}
        for key in ("data_dir", "model"):
            if key in values:
                values[key] = Path(values[key])
        for key in ("listen", "bootstrap"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def host_config(self) -> HostConfig:
        """The p2p host this node runs."""
        return HostConfig(listen_addrs=self.listen, bootstrap=self.bootstrap,
                          enable_mdns=self.mdns, link_delay_s=self.link_delay_s,
                          link_bandwidth_bps=self.link_bandwidth_bps)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What a TOML value must be, by key, where `NodeConfig` would take a wrong type without a word
# (a string for `bootstrap` would become a tuple of its characters) or fail with a TypeError.
_TOML_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    **{k: ("a string", lambda v: isinstance(v, str))
       for k in ("data_dir", "model", "span", "packed_weights", "device")},
    **{k: ("an integer", _is_int)
       for k in ("memory_budget_bytes", "threads", "prefill_threads", "max_sessions",
                 "max_cache_tokens", "max_length")},
    **{k: ("a list of strings", lambda v: isinstance(v, list)
           and all(isinstance(a, str) for a in v)) for k in ("listen", "bootstrap")},
    "mdns": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_toml_types(path: Path, raw: dict[str, Any]) -> None:
    for key, value in raw.items():
        expected = _TOML_TYPES.get(key)
        if expected is not None and not expected[1](value):
            raise NodeError(f"{path}: {key} must be {expected[0]}, got {value!r}")


def parse_span(text: str, num_stages: int) -> tuple[int, int] | None:
    """`auto` -> None; `a:b` -> (a, b), checked against the model."""
    if text == "auto":
        return None
    try:
        a_text, b_text = text.split(":")
        a, b = int(a_text), int(b_text)
    except ValueError:
        raise NodeError(f"span must be 'auto' or 'a:b', got {text!r}") from None
    if not 0 <= a < b <= num_stages:
        raise NodeError(f"span {a}:{b} is outside the model's stages 0:{num_stages}")
    return a, b


def stage_costs(ckpt: Checkpoint, config: NodeConfig) -> tuple[int, ...]:
    """What each stage of `ckpt` costs this node: weights plus the KV-cache reserve."""
    device = pick_device(config.device)
    dtype = compute_dtype(ckpt.config.dtype, device)
    weights = [ckpt.stage_nbytes(s, dtype) for s in range(ckpt.config.num_stages)]
    block = 2 * ckpt.config.num_kv_heads * ckpt.config.head_dim * dtype.itemsize
    return stage_memory_bytes(weight_bytes=weights,
                              cache_bytes_per_block=block * config.limits.max_cache_tokens)


PACKED_WEIGHTS = ("auto", "on", "off")


def should_pack(setting: str, *, span_bytes: int, weight_bytes: int, budget_bytes: int) -> bool:
    """Whether a node holds a packed copy of its span's matrices (`Span.pack`).

    The copy makes batched decode steps and prefill much faster (`sharding/_model.py`) and
    costs the weights' memory once more, so `auto` takes it only when the memory budget holds
    the span (`span_bytes`: weights plus the KV-cache reserve) and `weight_bytes` besides: the
    budget first buys stages for the swarm, and only memory left over buys speed.
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    return span_bytes + weight_bytes <= budget_bytes


def _measure_throughput(span: Span) -> float:
    """Tokens per second through one stage of this span, from a few decode steps."""
    cache = span.new_cache(8)
    x: torch.Tensor
    if span.start == 0:
        x = torch.zeros(1, 1, dtype=torch.int64)
    else:
        x = torch.zeros(1, 1, span.config.hidden_size)
    with torch.inference_mode():
        span(x, cache)
        started = time.perf_counter()
        for _ in range(4):
            span(x, cache, last_only=True)
        per_step = (time.perf_counter() - started) / 4
    return (span.end - span.start) / max(per_step, 1e-6)


# -- waking up --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockReading:
    """Both clocks read at one tick: `wall` is `time.time()`, `mono` `time.monotonic()`."""

    wall: float
    mono: float


@dataclass(frozen=True, slots=True)
class ClockJump:
    """What the clocks did between two ticks that were `interval_s` apart by the timer."""

    wall_s: float
    mono_s: float

    @property
    def away_s(self) -> float:
        """About how long the node was away (asleep, stopped or skewed)."""
        return max(abs(self.wall_s - self.mono_s), self.mono_s)


def detect_clock_jump(before: ClockReading, after: ClockReading, *, interval_s: float,
                      threshold_s: float) -> ClockJump | None:
    """A `ClockJump` when the node was away between two ticks, else None.

    Away means: the wall clock and the monotonic clock moved apart by more than `threshold_s`
    (a suspend, which only the wall clock counts; or a wall-clock step), or the monotonic clock
    moved more than `threshold_s` past the tick's `interval_s` (a process stopped, or a clock
    that counts suspend). A late tick under load stays under a threshold of a few seconds; a
    false alarm only costs a re-announcement.

    Raises:
        ValueError: A reading that is not finite, or a non-positive interval or threshold.
    """
    for value in (before.wall, before.mono, after.wall, after.mono):
        if not math.isfinite(value):
            raise ValueError(f"clock readings must be finite, got {value!r}")
    if not (interval_s > 0 and threshold_s > 0):
        raise ValueError("interval_s and threshold_s must be > 0")
    wall, mono = after.wall - before.wall, after.mono - before.mono
    if abs(wall - mono) > threshold_s or mono > interval_s + threshold_s or mono < 0:
        return ClockJump(wall_s=wall, mono_s=mono)
    return None


async def watch_clock(*, interval_s: float, threshold_s: float,
                      on_jump: Callable[[ClockJump], Awaitable[None]],
                      wall: Clock = time.time, mono: Clock = time.monotonic) -> None:
    """Tick every `interval_s` and await `on_jump` after every tick that follows a sleep.

    The clocks are parameters so tests can make time jump.
    """
    before = ClockReading(wall(), mono())
    while True:
        await trio.sleep(interval_s)
        now = ClockReading(wall(), mono())
        jump = detect_clock_jump(before, now, interval_s=interval_s, threshold_s=threshold_s)
        if jump is not None:
            logger.info("clocks jumped (wall %+.1f s, monotonic %+.1f s over a %.1f s tick): "
                        "re-announcing and re-checking connections", jump.wall_s, jump.mono_s,
                        interval_s)
            await on_jump(jump)
            now = ClockReading(wall(), mono())  # the reaction's own time is not a jump
        before = now


async def redial_bootstrap(host: Host, addrs: tuple[str, ...]) -> int:
    """Dial the bootstrap peers we are not connected to; returns how many came back.

    Best effort: an unreachable peer is logged and left to the host's own retry loop.
    """
    redialed = 0
    for addr in addrs:
        try:
            peer, _ = parse_peer_addr(addr)
            if peer == host.peer_id or host.is_connected(peer):
                continue
            await host.connect(addr)
        except DialError as exc:
            logger.info("bootstrap %s still unreachable after waking up: %s", addr, exc)
            continue
        redialed += 1
    return redialed


# -- the running node -------------------------------------------------------------------------


@dataclass(slots=True)
class _Live:
    """What a serving node serves right now; the daemon's tasks replace it as it moves."""

    worker: SpanWorker | None
    start: int
    end: int
    throughput: float
    state: AnnouncementState = AnnouncementState.JOINING
    rebalances: int = 0
    wakes: int = 0


class RunningNode:
    """What `run_node` reports once started: its host and, when serving, what it serves now.

    `worker`, `span` and the counters are read live: a node that moves to another span
    serves it through a new worker.
    """

    def __init__(self, host: Host, *, announcer: Announcer | None = None,
                 live: _Live | None = None, wakes: Callable[[], int] | None = None,
                 pushes: SessionPool | None = None) -> None:
        self.host = host
        self.announcer = announcer
        self.pushes = pushes  # push streams kept between sessions
        self._live = live
        self._wakes = wakes or (lambda: live.wakes if live is not None else 0)

    @property
    def worker(self) -> SpanWorker | None:
        """The worker of the current span (None for a bootstrap, or while moving)."""
        return self._live.worker if self._live is not None else None

    @property
    def span(self) -> tuple[int, int] | None:
        """The span served (or being loaded) now."""
        return (self._live.start, self._live.end) if self._live is not None else None

    @property
    def rebalances(self) -> int:
        """How many times this node moved to another span."""
        return self._live.rebalances if self._live is not None else 0

    @property
    def wakes(self) -> int:
        """How many sleeps (clock jumps) this node noticed."""
        return self._wakes()


@dataclass(frozen=True, slots=True)
class Clocks:
    """The clocks the wake-up watch reads (tests substitute their own)."""

    wall: Clock = time.time
    mono: Clock = time.monotonic


async def run_node(config: NodeConfig, *, role: str = "node", clocks: Clocks | None = None,
                   task_status: TaskStatus[RunningNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node (or a bootstrap) until SIGINT/SIGTERM or cancellation."""
    from node._swarm import AnnouncementSwarm

    clocks = clocks or Clocks()
    torch.set_num_threads(max(1, config.threads))
    identity = Identity.load_or_create(config.data_dir)
    status: dict[str, Any] = {"role": role, "peer_id": identity.peer_id_str, "addrs": [],
                              "state": "joining", "span": None, "model_id": None,
                              "rebalances": 0, "wakes": 0}

    def publish_status(**changes: Any) -> None:
        status.update(changes)
        write_status(config.data_dir, **status)

    async with open_host(identity, config.host_config()) as host, \
            trio.open_nursery() as nursery:
        publish_status(addrs=list(host.listen_addrs()))
        logger.info("%s %s listening on %s", role, identity.peer_id_str,
                    ", ".join(host.listen_addrs()))
        stop = trio.Event()
        nursery.start_soon(_signals, stop)
        if role == "bootstrap":
            async with AnnouncementSwarm.watch(host, None):  # relay announcements
                wakes = 0

                async def woke(jump: ClockJump) -> None:
                    nonlocal wakes
                    wakes += 1
                    await redial_bootstrap(host, config.bootstrap)
                    publish_status(wakes=wakes)

                nursery.start_soon(lambda: watch_clock(
                    interval_s=config.wake_check_interval_s, threshold_s=config.clock_jump_s,
                    on_jump=woke, wall=clocks.wall, mono=clocks.mono))
                publish_status(state="online")
                task_status.started(RunningNode(host, wakes=lambda: wakes))
                await stop.wait()
            publish_status(state="stopped")
            nursery.cancel_scope.cancel()
            return

        ckpt = await trio.to_thread.run_sync(Checkpoint.open, config.model)
        model_id = await trio.to_thread.run_sync(lambda: ckpt.model_id)
        publish_status(model_id=model_id)
        from node._protocol import PROTOCOL

        async with AnnouncementSwarm.watch(host, model_id) as swarm, open_session_pool(
                host, PROTOCOL, config=SessionConfig(dead_after=config.dead_after_s)) as pushes:
            announcer = Announcer(host, identity, model_id=model_id, version=VERSION,
                                  ttl_s=config.announce_ttl_s)
            server = _Server(config=config, host=host, ckpt=ckpt, model_id=model_id,
                             swarm=swarm, announcer=announcer, publish_status=publish_status)
            server.pushes = pushes
            await server.start(stop)
            if stop.is_set():
                publish_status(state="stopped")
                nursery.cancel_scope.cancel()
                return
            task_status.started(RunningNode(host, announcer=announcer, live=server.live,
                                            pushes=pushes))
            async with trio.open_nursery() as inner:
                inner.start_soon(announcer.keep_publishing, server.announcement,
                                 config.announce_interval_s)
                inner.start_soon(lambda: watch_clock(
                    interval_s=config.wake_check_interval_s, threshold_s=config.clock_jump_s,
                    on_jump=server.woke, wall=clocks.wall, mono=clocks.mono))
                if config.span == "auto" and config.rebalance_interval_s > 0:
                    inner.start_soon(server.keep_balancing)
                await stop.wait()
                inner.cancel_scope.cancel()
            await server.drain()
        nursery.cancel_scope.cancel()


class _Server:
    """The serving side of `run_node`: one span at a time, moved when the swarm needs it."""

    def __init__(self, *, config: NodeConfig, host: Host, ckpt: Checkpoint, model_id: str,
                 swarm: AnnouncementSwarm, announcer: Announcer,
                 publish_status: Callable[..., None]) -> None:
        self.config = config
        self.host = host
        self.ckpt = ckpt
        self.model_id = model_id
        self.swarm = swarm
        self.announcer = announcer
        self.publish_status = publish_status
        self.num_stages = ckpt.config.num_stages
        self.costs = stage_costs(ckpt, config)
        self.live = _Live(worker=None, start=0, end=self.num_stages, throughput=0.0)
        self.pushes: SessionPool | None = None  # push streams kept between sessions
        self.rng = random.Random()
        self._hold_moves_until = -math.inf

    @property
    def peer_id(self) -> str:
        return str(self.host.peer_id)

    def announcement(self) -> AnnouncementFields:
        """This node as it should be announced now."""
        live = self.live
        fields = AnnouncementFields(start=live.start, end=live.end, state=live.state,
                                    addrs=self.host.listen_addrs(), throughput=live.throughput)
        if live.worker is None or live.state != AnnouncementState.ONLINE:
            return fields
        stats = live.worker.statistics()
        return replace(fields, free_cache_tokens=stats.cache_tokens_free,
                       load=min(0.99, stats.sessions / self.config.limits.max_sessions))

    def _others(self) -> list[Any]:
        return [s for s in self.swarm.snapshots() if s.peer_id != self.peer_id]

    async def start(self, stop: trio.Event) -> None:
        """Choose (or take) the span, load it, serve it, announce `online`."""
        config = self.config
        span_range = parse_span(config.span, self.num_stages)
        if span_range is None:
            with trio.move_on_after(startup_jitter_s(rng=self.rng, max_s=config.jitter_s)
                                    + config.swarm_settle_s):
                await stop.wait()
            if stop.is_set():
                return
            try:
                others = self._others()
            except ValueError as exc:  # a peer announced something our snapshots refuse
                logger.warning("choosing a span as if alone: the swarm view is unusable: %s",
                               exc)
                others = []
            chosen = choose_span(num_stages=self.num_stages, stage_bytes=self.costs,
                                 memory_budget_bytes=config.memory_budget_bytes,
                                 model_id=self.model_id, swarm=others)
            span_range = (chosen.start, chosen.end)
        self.live.start, self.live.end = span_range
        self.publish_status(span=list(span_range))
        await self.announcer.publish(self.announcement())
        await self._load_and_serve()

        from node._protocol import PROTOCOL

        self.host.set_session_handler(PROTOCOL, self._handle,
                                      config=SessionConfig(dead_after=config.dead_after_s))
        await self.announcer.publish(self.announcement())

    async def _load_and_serve(self, *, moved: bool = False) -> None:
        """Load `live`'s span off the event loop, measure it, make it the served one."""
        config, live = self.config, self.live
        start, end = live.start, live.end
        dtype = compute_dtype(self.ckpt.config.dtype, pick_device(config.device))
        pack = should_pack(config.packed_weights, span_bytes=sum(self.costs[start:end]),
                           weight_bytes=sum(self.ckpt.stage_nbytes(s, dtype)
                                            for s in range(start, end)),
                           budget_bytes=config.memory_budget_bytes)
        span = await trio.to_thread.run_sync(
            lambda: Span.load(self.ckpt, start, end, device=config.device, pack=pack))
        worker = SpanWorker(span, model_id=self.model_id, limits=config.limits,
                            decode_threads=max(1, config.threads),
                            prefill_threads=config.prefill_threads or default_prefill_threads(
                                config.threads))
        live.throughput = await trio.to_thread.run_sync(_measure_throughput, span)
        live.worker, live.state = worker, AnnouncementState.ONLINE
        live.rebalances += moved
        self.publish_status(state="online", span=[start, end], rebalances=live.rebalances)
        logger.info("serving stages [%d, %d) of %s (%.0f tokens/s per stage%s)", start, end,
                    self.model_id[:12], live.throughput,
                    ", packed copy for batches" if span.packed else "")

    async def _handle(self, session: SessionStream) -> None:
        # The worker of the moment, per session: a kept stream outlives a move to another
        # span, and while the new span loads, sessions are refused as retryable.
        await serve_inference(lambda: self.live.worker, session, host=self.host,
                              pushes=self.pushes)

    # -- moving ---------------------------------------------------------------------------------

    def wanted_move(self) -> StageSpan | None:
        """The span to move to, if the swarm would be clearly better balanced; else None."""
        live, config = self.live, self.config
        if live.worker is None or live.state != AnnouncementState.ONLINE:
            return None
        current = StageSpan(live.start, live.end)
        try:
            others = self._others()
            args: dict[str, Any] = dict(
                num_stages=self.num_stages, stage_bytes=self.costs,
                memory_budget_bytes=config.memory_budget_bytes, model_id=self.model_id,
                swarm=others)
            if not should_rebalance(current=current, own_throughput_tokens_per_s=live.throughput,
                                    min_improvement=config.rebalance_min_improvement, **args):
                return None
            return choose_span(**args)
        except ValueError as exc:  # a peer announced something our snapshots refuse
            logger.warning("not rebalancing: the swarm view is unusable: %s", exc)
            return None

    async def keep_balancing(self) -> None:
        """Every `rebalance_interval_s` (±25 %), move if the swarm needs it (see "Moving")."""
        config = self.config
        while True:
            await trio.sleep(config.rebalance_interval_s * (0.75 + 0.5 * self.rng.random()))
            if trio.current_time() < self._hold_moves_until or self.wanted_move() is None:
                continue
            live = self.live
            try:
                rank = move_rank(peer_id=self.peer_id, current=StageSpan(live.start, live.end),
                                 num_stages=self.num_stages, model_id=self.model_id,
                                 swarm=self._others())
            except ValueError as exc:
                logger.warning("not rebalancing: the swarm view is unusable: %s", exc)
                continue
            # A node that goes first notices the gap at its own next tick, up to a jittered
            # interval after us, and its claim needs a settle period to reach us: wait that
            # long per node ahead of us before asking again.
            ahead = rank * (1.25 * config.rebalance_interval_s + config.swarm_settle_s)
            await trio.sleep(ahead + 0.5 * config.swarm_settle_s * self.rng.random())
            target = self.wanted_move()  # again, on what the swarm says now
            if target is not None and trio.current_time() >= self._hold_moves_until:
                await self.move(target)

    async def move(self, target: StageSpan) -> None:
        """Leave the current span for `target` (see "Moving" in the module docstring)."""
        live, config = self.live, self.config
        old = live.worker
        logger.info("moving from stages [%d, %d) to [%d, %d): the swarm needs them more",
                    live.start, live.end, target.start, target.end)
        if old is not None:
            old.accepting = False
        live.start, live.end, live.state = target.start, target.end, AnnouncementState.JOINING
        self.publish_status(state="joining", span=[target.start, target.end])
        with trio.move_on_after(1.0):
            await self.announcer.publish(self.announcement())
        if old is not None:
            with trio.move_on_after(config.grace_s):
                await old.wait_idle()
        live.worker = old = None  # free the old span before loading the new one
        await self._load_and_serve(moved=True)
        await self.announcer.publish(self.announcement())

    # -- waking up ----------------------------------------------------------------------------

    async def woke(self, jump: ClockJump) -> None:
        """After a sleep: announce fresh records, re-dial lost bootstrap peers, hold moves."""
        config, live = self.config, self.live
        live.wakes += 1
        # Fresh records from the others need about an announce interval to arrive; until then
        # our view of the swarm is what expired while we slept.
        self._hold_moves_until = (trio.current_time() + config.swarm_settle_s
                                  + 2 * config.announce_interval_s)
        await self.announcer.publish(self.announcement())
        if await redial_bootstrap(self.host, config.bootstrap):
            await self.announcer.publish(self.announcement())
        self.publish_status(wakes=live.wakes)

    # -- leaving --------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new sessions, tell the swarm, let open sessions finish (bounded)."""
        from node._protocol import PROTOCOL

        live = self.live
        worker = live.worker
        if worker is not None:
            worker.accepting = False
        live.state = AnnouncementState.DRAINING
        self.publish_status(state="draining")
        with trio.move_on_after(1.0):
            await self.announcer.publish(self.announcement())
        if worker is not None:
            with trio.move_on_after(self.config.grace_s):
                await worker.wait_idle()
        self.host.remove_stream_handler(PROTOCOL)
        self.publish_status(state="stopped")


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


def with_overrides(config: NodeConfig, **changes: Any) -> NodeConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


def default_prefill_threads(threads: int) -> int:
    """Prefill is compute-bound: by default it uses every core (decode, memory-bound, keeps
    `threads`); OpenMP workers stop spinning right after a forward (see `node/__init__`), so
    the cores go back to other processes at once.

    "Every core" is every core this process may run on: a container or `taskset` limited to
    two cores of a 16-core host still sees 16 in `os.cpu_count()`, and 16 OpenMP threads on two
    cores made a 3-node pipeline's first token 4x slower (measured on such a host)."""
    return max(threads, available_cores())
