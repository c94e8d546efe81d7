"""The node daemon: join the overlay, pick and load a span, serve it, leave cleanly.

Theory of operation
-------------------
`run_node` is one structured lifetime:

1. load the identity from the data directory (same peer id across restarts) and open the host;
2. announce `joining`; pick the span — `auto` waits a random jitter (so nodes started together
   do not all pick the same span), looks at the announced swarm, and calls the pure
   `choose_span` — then load it off the event loop;
3. measure the span's throughput, serve `/shardnet/inference/1`, announce `online`, and keep
   re-announcing (load, free cache) on a timer;
4. on SIGINT/SIGTERM: stop admitting sessions, announce `draining`, let open sessions finish for
   a grace period, then leave (total well under the ~5 s a supervisor waits).

The bootstrap role runs steps 1 and 4 only: a host with the DHT and gossip, serving no model.
Every state change is also written to `status.json` for the devnet and for people.
"""

from __future__ import annotations

import logging
import random
import signal
import time
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio

from node._errors import NodeError
from node._service import serve_inference
from node._span_choice import choose_span, stage_memory_bytes, startup_jitter_s
from node._status import write_status
from node._worker import ServerLimits, SpanWorker
from p2p import (
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    Host,
    HostConfig,
    Identity,
    SessionConfig,
    open_host,
)
from sharding import EMBEDDED_MODEL, Checkpoint, Span, compute_dtype, pick_device

if TYPE_CHECKING:
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class RunningNode:
    """What `run_node` reports once started: its host and (when serving) its worker."""

    host: Host
    worker: SpanWorker | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node daemon is told (flags and/or a TOML file)."""

    data_dir: Path
    model: Path = EMBEDDED_MODEL
    span: str = "auto"
    memory_budget_bytes: int = 4 << 30
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    threads: int = 1
    prefill_threads: int | None = None
    device: str | None = None
    mdns: bool = True
    limits: ServerLimits = field(default_factory=ServerLimits)
    grace_s: float = 3.0
    announce_interval_s: float = 2.0
    announce_ttl_s: float = 10.0
    jitter_s: float = 1.0
    swarm_settle_s: float = 1.0
    dead_after_s: float = 5.0

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


async def run_node(config: NodeConfig, *, role: str = "node",
                   task_status: TaskStatus[RunningNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node (or a bootstrap) until SIGINT/SIGTERM or cancellation."""
    from node._swarm import AnnouncementSwarm

    torch.set_num_threads(max(1, config.threads))
    identity = Identity.load_or_create(config.data_dir)
    status: dict[str, Any] = {"role": role, "peer_id": identity.peer_id_str, "addrs": [],
                              "state": "joining", "span": None, "model_id": None}

    def publish_status(**changes: Any) -> None:
        status.update(changes)
        write_status(config.data_dir, **status)

    host_config = HostConfig(listen_addrs=config.listen, bootstrap=config.bootstrap,
                             enable_mdns=config.mdns)
    async with open_host(identity, host_config) as host, trio.open_nursery() as nursery:
        publish_status(addrs=list(host.listen_addrs()))
        logger.info("%s %s listening on %s", role, identity.peer_id_str,
                    ", ".join(host.listen_addrs()))
        stop = trio.Event()
        nursery.start_soon(_signals, stop)
        if role == "bootstrap":
            async with AnnouncementSwarm.watch(host, None):  # relay announcements
                publish_status(state="online")
                task_status.started(RunningNode(host))
                await stop.wait()
            publish_status(state="stopped")
            nursery.cancel_scope.cancel()
            return

        ckpt = await trio.to_thread.run_sync(Checkpoint.open, config.model)
        model_id = await trio.to_thread.run_sync(lambda: ckpt.model_id)
        publish_status(model_id=model_id)
        async with AnnouncementSwarm.watch(host, model_id) as swarm:
            announcer = Announcer(host, identity, model_id=model_id, version=VERSION,
                                  ttl_s=config.announce_ttl_s)
            span_range = parse_span(config.span, ckpt.config.num_stages)
            if span_range is None:
                rng = random.Random()
                with trio.move_on_after(startup_jitter_s(rng=rng, max_s=config.jitter_s)
                                        + config.swarm_settle_s):
                    await stop.wait()
                device = pick_device(config.device)
                dtype = compute_dtype(ckpt.config.dtype, device)
                weights = [ckpt.stage_nbytes(s, dtype) for s in range(ckpt.config.num_stages)]
                block = 2 * ckpt.config.num_kv_heads * ckpt.config.head_dim * dtype.itemsize
                costs = stage_memory_bytes(
                    weight_bytes=weights,
                    cache_bytes_per_block=block * config.limits.max_cache_tokens)
                chosen = choose_span(num_stages=ckpt.config.num_stages, stage_bytes=costs,
                                     memory_budget_bytes=config.memory_budget_bytes,
                                     model_id=model_id,
                                     swarm=[s for s in swarm.snapshots()
                                            if s.peer_id != identity.peer_id_str])
                span_range = (chosen.start, chosen.end)
            start, end = span_range
            publish_status(span=[start, end])
            await announcer.publish(AnnouncementFields(
                start=start, end=end, state=AnnouncementState.JOINING,
                addrs=host.listen_addrs()))
            span = await trio.to_thread.run_sync(
                lambda: Span.load(ckpt, start, end, device=config.device))
            worker = SpanWorker(span, model_id=model_id, limits=config.limits,
                                decode_threads=max(1, config.threads),
                                prefill_threads=config.prefill_threads or config.threads)
            throughput = await trio.to_thread.run_sync(_measure_throughput, span)

            async def handler(session: Any) -> None:
                await serve_inference(worker, session)

            from node._protocol import PROTOCOL

            host.set_session_handler(PROTOCOL, handler,
                                     config=SessionConfig(dead_after=config.dead_after_s))

            def announcement(state: AnnouncementState) -> AnnouncementFields:
                stats = worker.statistics()
                return AnnouncementFields(
                    start=start, end=end, state=state, addrs=host.listen_addrs(),
                    throughput=throughput, free_cache_tokens=stats.cache_tokens_free,
                    load=min(0.99, stats.sessions / config.limits.max_sessions))

            await announcer.publish(announcement(AnnouncementState.ONLINE))
            publish_status(state="online")
            logger.info("serving stages [%d, %d) of %s (%.0f tokens/s per stage)", start, end,
                        model_id[:12], throughput)
            task_status.started(RunningNode(host, worker))
            async with trio.open_nursery() as inner:
                inner.start_soon(announcer.keep_publishing,
                                 lambda: announcement(AnnouncementState.ONLINE),
                                 config.announce_interval_s)
                await stop.wait()
                inner.cancel_scope.cancel()
            # Draining: refuse new sessions, tell the swarm, let open sessions finish.
            worker.accepting = False
            publish_status(state="draining")
            with trio.move_on_after(1.0):
                await announcer.publish(announcement(AnnouncementState.DRAINING))
            with trio.move_on_after(config.grace_s):
                await worker.wait_idle()
            host.remove_stream_handler(PROTOCOL)
            publish_status(state="stopped")
        nursery.cancel_scope.cancel()


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


def with_overrides(config: NodeConfig, **changes: Any) -> NodeConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
