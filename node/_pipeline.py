"""One generation's chain of hops: push or client-driven steps, and failover.

Theory of operation
-------------------
A `Pipeline` owns the sessions of one generation (one `RemoteHop` per hop of the route) and
runs each forward step across them. It is the single consumer of the hops' `HopEvent`s.

*Push* (the default when every link works): the hops are opened, each told its successor, and a
step is sent to the first hop only; each hop forwards its output to the next, and every hop's
output also comes back here — small ones (a decode step's) along the chain, all in the last
hop's answer, large ones (a long prompt's) as a copy from each hop (`node/_service.py`). A
token then crosses one leg per hop plus one back, instead of two per hop. *Client-driven*: the
client sends every hop its input itself. Both modes can mix within one step: when a hop says it
did not push (`pushed=False`), the client sends the next hop that output itself.

Every hop's output arrives here either way; it is checked (blaming the hop that produced it)
and kept as the next hop's input history. A step is done when the last hop's output is in.
While waiting, the decision point is the first hop `m` without an output: if `m` failed (its
stream broke, its heartbeats stopped, it refused the step, it sent garbage, or it timed out),
it is replaced — banned with backoff, its stages re-routed (maybe over several peers), the
replacement rebuilt by replaying `m`'s kept inputs step by step — and the step goes on from
`m`, client-driven for the rest of the generation. If a hop after `m` fails while `m`'s output
is still on its way along the chain, the step is sent to `m` again, client-driven from there on
(what `m` pushed may never arrive). Replayed and resent steps carry `rollback`,
which makes them idempotent: a hop that already computed a position (e.g. from a push of a
hop that then died) recomputes it from the same cache prefix and the same input, so greedy
output is identical with or without a failure.

A multi-token prompt in push mode is cut into chunks sent back to back, so the hops work on
different chunks at once (pipeline parallelism over the prompt); if anything fails during
that, the whole pipeline is reopened on a fresh route and the prompt sent again.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import trio

from node._errors import GenerationError, HopFailedError, RefusedError, SessionRefusedError
from node._hop import CLOSE_TIMEOUT_S, HopEvent, Kept, RemoteHop
from node._local import LocalStages, SharedHead
from node._protocol import Refusal, StepOutput
from node._routing import Hop, Route
from node._tensors import hidden_to_wire, ids_to_wire
from p2p import PeerId, SessionConfig, Tensor

if TYPE_CHECKING:
    from node._client import Client, RunInfo

logger = logging.getLogger(__name__)


class _Restart(Exception):
    """A chunked push prefill failed: reopen the pipeline and send the prompt again."""

    def __init__(self, hop: RemoteHop, error: Exception) -> None:
        super().__init__(str(error))
        self.hop = hop
        self.error = error


class Pipeline:
    """The hops of one generation and how a step crosses them."""

    def __init__(self, client: Client, *, max_length: int, prompt_tokens: int, info: RunInfo,
                 embed: LocalStages | None, head: SharedHead | None,
                 want_push: bool = True) -> None:
        self.want_push = want_push
        self.client = client
        self.config = client.config
        self.max_length = max_length
        self.prompt_tokens = prompt_tokens
        self.info = info
        self.embed, self.head = embed, head
        self.hops: list[RemoteHop] = []
        self.push = False
        self._step = 0
        self._send, self._events = trio.open_memory_channel[HopEvent](math.inf)

    # -- opening -----------------------------------------------------------------------------

    async def open(self, route: Route) -> None:
        """Open the route's sessions (push when it has more than one hop and it is allowed)."""
        self.push = self.want_push and len(route.hops) > 1
        self.hops = await self._open_hops(route, push=self.push)
        self.push = self.push and all(h.pushing for h in self.hops[:-1])
        self.info.route = route
        self.info.push = self.push

    async def _open_hops(self, route: Route, *, push: bool) -> list[RemoteHop]:
        """Open every hop of `route` at once (a hop's push stream waits for its successor)."""
        client = self.client
        nursery, swarm = client.running()
        c = client.model_config
        ids = [secrets.token_bytes(16) for _ in route.hops]
        hops: list[RemoteHop] = []
        for i, hop in enumerate(route.hops):
            successor = None
            if push and i + 1 < len(route.hops):
                successor = (swarm.addrs(route.hops[i + 1].peer_id), ids[i + 1])
            hops.append(RemoteHop(
                client.host, peer=PeerId.from_string(hop.peer_id), addrs=swarm.addrs(hop.peer_id),
                start=hop.start, end=hop.end, model_id=client.model_id,
                max_length=self.max_length, codec=self.config.codec, session_id=ids[i],
                hidden_size=c.hidden_size, vocab_size=c.vocab_size, num_stages=c.num_stages,
                session_config=SessionConfig(dead_after=self.config.dead_after_s),
                events=self._send.clone(), pool=client.streams, successor=successor,
                predecessor=route.hops[i - 1].peer_id if push and i > 0 else ""))
        failures: list[HopFailedError] = []

        async def start(remote: RemoteHop) -> None:
            try:
                await nursery.start(remote.run)
            except HopFailedError as exc:
                failures.append(exc)

        async with trio.open_nursery() as starting:
            for remote in hops:
                starting.start_soon(start, remote)
        if failures:
            for remote in hops:
                remote.aclose()
            raise failures[0]
        return hops

    def close(self) -> None:
        for hop in self.hops:
            hop.aclose()

    async def aclose(self) -> None:
        """Close every hop and wait (bounded) until their servers have freed the sessions:
        on two vCPUs, four processes tearing sessions down while the next generation opens
        its route slowed its first token (back-to-back 1-token generations, embedded model)."""
        self.close()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            for hop in self.hops:
                await hop.done.wait()

    # -- stepping ----------------------------------------------------------------------------

    async def forward(self, position: int, ids: torch.Tensor) -> torch.Tensor:
        """The generation loop's `Forward`: the last position's logits, shape (V,)."""
        x = ids
        if self.embed is not None:
            x = await self.embed.step(position, x, last_only=False)
        chunk = self.config.prefill_chunk
        if self.push and position == 0 and chunk > 0 and x.shape[1] > chunk:
            out = await self._chunked_prefill(x, chunk)
        else:
            out = await self._run_step(position, self._to_wire(x))
        if self.head is not None:
            out = await self.head.step(position, out[:, -1:], last_only=True)
        return out[0, -1].float()

    def _to_wire(self, x: torch.Tensor) -> Tensor:
        return ids_to_wire(x) if self.hops[0].start == 0 else hidden_to_wire(x, self.config.codec)

    def _next_step(self) -> int:
        self._step += 1
        return self._step - 1

    def _outputs(self, index: int, reply: StepOutput) -> list[tuple[int, Tensor]]:
        """(hop, output) pairs a reply from hop `index` brings: the carried ones, then its own."""
        first = index - len(reply.carried)
        if first < 0:
            raise self.hops[index].failure(f"carried {len(reply.carried)} outputs, "
                                           f"but only {index} hops come before it")
        return [(first + j, t) for j, t in enumerate((*reply.carried, reply.output))]

    async def _run_step(self, position: int, payload: Tensor) -> torch.Tensor:
        """One step across all hops, failing over as needed; returns the last hop's output."""
        step = self._next_step()
        tokens = payload.shape[1] if len(payload.shape) > 1 else 1
        have: dict[int, Tensor] = {}  # each hop's output, by hop index
        pushed_on: set[int] = set()  # hops whose output went on to their successor by push
        sent: set[int] = set()
        refused: dict[int, RefusedError] = {}
        driven = not self.push  # the client sends every remaining hop its input itself
        replaced = False  # a hop was replaced in this step: the hop indices moved
        last: torch.Tensor | None = None
        deadline = trio.current_time() + self.config.step_timeout_s
        while True:
            m = next((i for i in range(len(self.hops)) if i not in have), None)
            if m is None:
                break
            hop = self.hops[m]
            error: Exception | None = hop.failed or refused.get(m)
            if error is None and trio.current_time() >= deadline:
                error = trio.TooSlowError(f"peer {hop.peer_id[:16]}: no output within "
                                          f"{self.config.step_timeout_s:.0f} s")
            if error is not None:
                await self._replace(m, error)
                have = {i: o for i, o in have.items() if i < m}
                pushed_on = {i for i in pushed_on if i < m - 1}
                sent = {i for i in sent if i < m}
                refused.clear()
                driven = replaced = True
                deadline = trio.current_time() + self.config.step_timeout_s
                continue
            if not driven and any(h.failed is not None or i in refused
                                  for i, h in enumerate(self.hops) if i > m):
                # The chain broke after `m`: what `m` pushed may never come back. Ask again.
                driven = True
                sent.discard(m)
            if m not in sent and (m == 0 or driven or m - 1 not in pushed_on):
                inp = payload if m == 0 else have[m - 1]
                # Only the last hop's last row is read (`Step.last_only`); a pushed step
                # carries the flag down the chain, where only the last hop heeds it.
                last_only = not driven or m == len(self.hops) - 1
                try:
                    await hop.send(step, position, inp, rollback=True, last_only=last_only,
                                   push=not driven and hop.pushing)
                except HopFailedError as exc:
                    hop.failed = hop.failed or exc
                    continue
                sent.add(m)
            event = await self._next_event(deadline)
            if event is None or event.reply is None:
                continue  # a timeout or a failure: both are read from the hops above
            index = self._index(event.hop)
            reply = event.reply
            if index is None:
                continue  # a replaced hop's leftovers
            if isinstance(reply, Refusal):
                if reply.step in (step, -1) and index not in have:
                    refused[index] = RefusedError(reply.code, reply.detail,
                                                  retryable=reply.retryable)
                continue
            if reply.step != step:
                continue  # a stale reply to an earlier (resent or replaced) step
            if replaced and reply.carried:
                # From the chain before the replacement: its carried outputs belong to hop
                # indices that have moved since (and driven steps carry nothing).
                continue
            try:
                outputs = self._outputs(index, reply)
            except HopFailedError as exc:
                self.hops[index].failed = exc
                continue
            final = len(self.hops) - 1
            for i, output in outputs:
                if i in have:
                    continue  # already in (a duplicate, or a resent step's first answer)
                try:  # only the last hop's output is read here; the others are kept
                    if i == final:
                        last = self.hops[i].check_output(output, tokens, last_only=True)
                    else:
                        self.hops[i].check_kept(output, tokens, last_only=False)
                except HopFailedError as exc:  # blames the hop that produced it
                    self.hops[i].failed = exc
                    break
                have[i] = output
                if i < index or reply.pushed:
                    pushed_on.add(i)
        for i, h in enumerate(self.hops):
            h.history.append(Kept(step, position, payload if i == 0 else have[i - 1]))
        if last is None:  # unreachable: the loop ends only with the last hop's output
            raise GenerationError("internal error: a step ended without an output")
        return last

    async def _chunked_prefill(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Send the prompt in chunks back to back; reopen the pipeline if anything fails."""
        while True:
            try:
                return await self._push_chunks(x, chunk)
            except _Restart as exc:
                await self._reopen(exc.hop, exc.error)

    async def _push_chunks(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        n = len(self.hops)
        steps: list[Kept] = []
        for pos in range(0, x.shape[1], chunk):
            kept = Kept(self._next_step(), pos, self._to_wire(x[:, pos:pos + chunk]))
            try:
                await self.hops[0].send(kept.step, pos, kept.input, rollback=pos == 0,
                                        last_only=True, push=True)
            except HopFailedError as exc:
                raise _Restart(self.hops[0], exc) from exc
            steps.append(kept)
        by_step = {k.step: k for k in steps}
        have: dict[tuple[int, int], Tensor] = {}  # (step, hop) -> that hop's output
        last: torch.Tensor | None = None
        deadline = trio.current_time() + self.config.step_timeout_s
        while len(have) < n * len(steps):
            for hop in self.hops:
                if hop.failed is not None:
                    raise _Restart(hop, hop.failed)
            event = await self._next_event(deadline)
            if event is None:
                stuck = next(i for i in range(n) if any((k.step, i) not in have for k in steps))
                raise _Restart(self.hops[stuck], trio.TooSlowError("prefill timed out"))
            index = self._index(event.hop)
            reply = event.reply
            if index is None or reply is None or reply.step not in by_step and reply.step != -1:
                continue
            hop = self.hops[index]
            if isinstance(reply, Refusal):
                raise _Restart(hop, RefusedError(reply.code, reply.detail,
                                                 retryable=reply.retryable))
            if index < n - 1 and not reply.pushed:
                raise _Restart(self.hops[index + 1], hop.failure("a push did not go through"))
            kept = by_step[reply.step]
            try:
                outputs = self._outputs(index, reply)
            except HopFailedError as exc:
                raise _Restart(hop, exc) from exc
            for i, output in outputs:
                try:
                    rows = kept.input.shape[1]
                    if i == n - 1 and kept is steps[-1]:
                        last = self.hops[i].check_output(output, rows, last_only=True)
                    else:
                        self.hops[i].check_kept(output, rows, last_only=i == n - 1)
                except HopFailedError as exc:  # blames the hop that produced it
                    raise _Restart(self.hops[i], exc) from exc
                have[(kept.step, i)] = output
        for kept in steps:
            for i, hop in enumerate(self.hops):
                hop.history.append(Kept(kept.step, kept.position, kept.input if i == 0
                                        else have[(kept.step, i - 1)]))
        if last is None:
            raise GenerationError("internal error: the prefill ended without an output")
        return last

    def _index(self, hop: RemoteHop) -> int | None:
        for i, h in enumerate(self.hops):
            if h is hop:
                return i
        return None

    async def _next_event(self, deadline: float) -> HopEvent | None:
        with trio.move_on_at(deadline):
            return await self._events.receive()
        return None

    # -- failover ----------------------------------------------------------------------------

    def _count_failure(self, peer_id: str, error: Exception) -> None:
        if isinstance(error, SessionRefusedError) and not error.refusal.retryable:
            # Another peer would refuse it too (e.g. a max_length over the node's limit).
            raise GenerationError(f"peer {peer_id[:16]} refused the session: "
                                  f"{error.refusal}") from error
        logger.info("failing over from peer %s: %s", peer_id[:16], error)
        self.info.failovers += 1
        if self.info.failovers > self.config.max_failovers:
            raise GenerationError(f"gave up after {self.info.failovers - 1} failovers: "
                                  f"{error}") from error
        self.client.bans = self.client.bans.record_failure(peer_id, now=time.monotonic())

    async def _replace(self, m: int, error: Exception) -> None:
        """Replace hop `m`: ban it, route its stages anew, replay its kept inputs."""
        failed = self.hops[m]
        failed.aclose()
        self._count_failure(failed.peer_id, error)
        self.push = False
        self.info.push = False
        started = time.perf_counter()
        while True:
            route = await self.client.route(self.max_length, 1,
                                            stages=(failed.start, failed.end))
            fresh: list[RemoteHop] = []
            try:
                fresh = await self._open_hops(route, push=False)
                await self._replay(fresh, failed.history)
            except HopFailedError as exc:
                for hop in fresh:
                    hop.aclose()
                self._count_failure(exc.peer_id, exc)
                continue
            break
        self.hops[m:m + 1] = fresh
        self.info.failover_s += time.perf_counter() - started
        self._update_route()

    async def _replay(self, fresh: list[RemoteHop], history: list[Kept]) -> None:
        """Rebuild the replacement's caches from exactly the inputs the failed hop got.

        The kept steps go to each fresh hop back to back (the server runs a session's steps
        in order), so the stall is the replay's compute plus one round trip per fresh hop,
        not one round trip per kept step; each step is computed as it originally was.
        """
        inputs = history
        for hop in fresh:
            for kept in inputs:
                await hop.send(kept.step, kept.position, kept.input, rollback=True,
                               last_only=hop.returns_logits)
            outputs = []
            for kept in inputs:
                reply = await self._reply_of(hop, kept.step, kept.input.shape[1])
                hop.history.append(kept)
                outputs.append(Kept(kept.step, kept.position, reply.output))
            inputs = outputs

    async def _reply_of(self, hop: RemoteHop, step: int, tokens: int) -> StepOutput:
        deadline = trio.current_time() + self.config.step_timeout_s
        while True:
            if hop.failed is not None:
                raise hop.failed
            event = await self._next_event(deadline)
            if event is None:
                raise hop.failure(f"no output within {self.config.step_timeout_s:.0f} s")
            reply = event.reply
            if event.hop is not hop or reply is None or reply.step not in (step, -1):
                continue
            if isinstance(reply, Refusal):
                raise hop.failure(f"refused a replayed step: {reply.code}: {reply.detail}")
            hop.check_kept(reply.output, tokens, hop.returns_logits)
            return reply

    async def _reopen(self, hop: RemoteHop, error: Exception) -> None:
        """Start over on a fresh route (a failure during a chunked prefill)."""
        self._count_failure(hop.peer_id, error)
        self.close()
        started = time.perf_counter()
        await self.open_route()
        self.info.failover_s += time.perf_counter() - started

    async def open_route(self) -> None:
        """Route all the stages this client needs and open them, retrying around failures."""
        while True:
            route = await self.client.route(self.max_length, self.prompt_tokens)
            try:
                await self.open(route)
            except HopFailedError as exc:
                self._count_failure(exc.peer_id, exc)
                continue
            return

    def _update_route(self) -> None:
        cost = self.info.route.cost_s if self.info.route is not None else 0.0
        self.info.route = Route(hops=tuple(Hop(h.peer_id, h.start, h.end) for h in self.hops),
                                cost_s=cost)


def prefer_push(latency: Mapping[bool, float], *, margin: float = 0.05) -> bool:
    """Whether the next generation should push, from measured seconds per token by mode.

    Push first (it crosses fewer legs); then client-driven once, to have both numbers; from
    then on the faster one, push winning within `margin` (it also spares the client's link).
    """
    if True not in latency:
        return True
    if False not in latency:
        return False
    return latency[True] <= latency[False] * (1.0 + margin)
